//! x86-64 SIMD dot products over GGUF blocks, one module per instruction set from one body:
//! `avx2` (AVX2 + FMA + F16C, `vpmaddubsw`/`vpmaddwd`) and `vnni` (the same with AVX-512
//! VNNI's `vpdpbusd`, 256-bit through AVX512VL).
//!
//! Each weight block is unpacked to 32 unsigned codes once and multiplied with up to four
//! activation rows (a 1×R tile), so prefill and batched decode reuse every unpacked block.
//! Integer sums per block are exact; the f32 scaling accumulates per lane (so results equal
//! the scalar reference up to float reassociation).

use super::{ActBlock, QMatrix, QType};

/// Type tags for the const-generic kernels.
const T4_0: u8 = 0;
const T4_1: u8 = 1;
const T5_0: u8 = 2;
const T5_1: u8 = 3;
const T8_0: u8 = 4;

fn tag(ty: QType) -> u8 {
    match ty {
        QType::Q4_0 => T4_0,
        QType::Q4_1 => T4_1,
        QType::Q5_0 => T5_0,
        QType::Q5_1 => T5_1,
        // Q8_0; the K-quants have their own kernels (`x86_k`).
        _ => T8_0,
    }
}

/// The 1×R tile loop shared by the 32-element and the K-quant kernels: every weight row in
/// `$rows` against the activation rows in groups of up to 4, through `$dots::<$t, R>`.
#[macro_export]
#[doc(hidden)]
macro_rules! drive_1xr {
    ($dots:ident, $t:ident, $w:ident, $rows:ident, $acts:ident, $blocks:ident, $put:ident) => {{
        let m = $acts.len() / $blocks;
        let a = |i: usize| $acts.as_ptr().add(i * $blocks);
        let mut i = 0;
        while i < m {
            let left = m - i;
            for j in $rows.clone() {
                let row = $w.row(j).as_ptr();
                match left {
                    1 => $put(i, j, $dots::<$t, 1>(row, $blocks, [a(i)])[0]),
                    2 => {
                        let o = $dots::<$t, 2>(row, $blocks, [a(i), a(i + 1)]);
                        (0..2).for_each(|r| $put(i + r, j, o[r]));
                    }
                    3 => {
                        let o = $dots::<$t, 3>(row, $blocks, [a(i), a(i + 1), a(i + 2)]);
                        (0..3).for_each(|r| $put(i + r, j, o[r]));
                    }
                    _ => {
                        let o = $dots::<$t, 4>(row, $blocks, [a(i), a(i + 1), a(i + 2), a(i + 3)]);
                        (0..4).for_each(|r| $put(i + r, j, o[r]));
                    }
                }
            }
            i += left.min(4);
        }
    }};
}

macro_rules! isa_kernels {
    ($name:ident, $features:literal, $mul_sum:item) => {
        pub(crate) mod $name {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::{tag, ActBlock, QMatrix, T4_0, T4_1, T5_0, T5_1, T8_0};

            /// u8 × i8 products summed in fours: 8 i32 lanes.
            $mul_sum

            #[inline]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn half(p: *const u8) -> f32 {
                let bits = u16::from_le_bytes([*p, *p.add(1)]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            /// 16 bytes of nibbles → 32 codes (low nibbles first, as ggml orders them).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(qs: *const u8) -> __m256i {
                let b = _mm_loadu_si128(qs as *const __m128i);
                let m4 = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(b, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
                _mm256_set_m128i(hi, lo)
            }

            /// 32 bits → 32 bytes of 0x10 where the bit is set (Q5's fifth bit).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn fifth_bits(qh: *const u8) -> __m256i {
                let x = u32::from_le_bytes([*qh, *qh.add(1), *qh.add(2), *qh.add(3)]) as i32;
                let shuf = _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0x0000000000000000,
                );
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
                let bit = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
                let set = _mm256_cmpeq_epi8(bit, _mm256_set1_epi64x(-1));
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            #[inline]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            /// One weight row (`nb` blocks of type `T`) against `R` activation rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dots<const T: u8, const R: usize>(
                row: *const u8,
                nb: usize,
                acts: [*const ActBlock; R],
            ) -> [f32; R] {
                let bb = match T {
                    T4_0 => 18,
                    T4_1 => 20,
                    T5_0 => 22,
                    T5_1 => 24,
                    _ => 34,
                };
                let offset = match T {
                    T4_0 => 8,
                    T5_0 => 16,
                    _ => 0,
                };
                let has_min = T == T4_1 || T == T5_1;
                let mut acc = [_mm256_setzero_ps(); R];
                let mut extra = [0f32; R];
                for b in 0..nb {
                    let blk = row.add(b * bb);
                    let d = half(blk);
                    let m = if has_min { half(blk.add(2)) } else { 0.0 };
                    let w = match T {
                        T4_0 => nibbles(blk.add(2)),
                        T4_1 => nibbles(blk.add(4)),
                        T5_0 => _mm256_or_si256(nibbles(blk.add(6)), fifth_bits(blk.add(2))),
                        T5_1 => _mm256_or_si256(nibbles(blk.add(8)), fifth_bits(blk.add(4))),
                        _ => _mm256_loadu_si256(blk.add(2) as *const __m256i),
                    };
                    // Q8_0 weights are signed: multiply |w| by a·sign(w).
                    let wu = if T == T8_0 { _mm256_sign_epi8(w, w) } else { w };
                    for r in 0..R {
                        let a = &*acts[r].add(b);
                        let mut av = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                        if T == T8_0 {
                            av = _mm256_sign_epi8(av, w);
                        }
                        let p = _mm256_cvtepi32_ps(mul_sum(wu, av));
                        let dd = d * a.d;
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dd), p, acc[r]);
                        if offset != 0 {
                            extra[r] -= dd * (offset * a.isum) as f32;
                        }
                        if has_min {
                            extra[r] += m * a.s;
                        }
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    out[r] = hsum(acc[r]) + extra[r];
                }
                out
            }

            #[target_feature(enable = $features)]
            unsafe fn tile_t<const T: u8>(
                w: &QMatrix,
                rows: Range<usize>,
                acts: &[ActBlock],
                blocks: usize,
                put: &mut dyn FnMut(usize, usize, f32),
            ) {
                crate::drive_1xr!(dots, T, w, rows, acts, blocks, put);
            }

            /// Rows `rows` of `w` times every activation row: `put(act_row, out_row, value)`.
            ///
            /// # Safety
            /// The CPU must have the features this module is compiled for
            /// (`crate::Isa::available` checks), and `acts` must hold whole rows of
            /// `w.cols() / 32` blocks.
            pub(crate) unsafe fn tile(
                w: &QMatrix,
                rows: Range<usize>,
                acts: &[ActBlock],
                blocks: usize,
                put: &mut dyn FnMut(usize, usize, f32),
            ) {
                match tag(w.qtype()) {
                    T4_0 => tile_t::<T4_0>(w, rows, acts, blocks, put),
                    T4_1 => tile_t::<T4_1>(w, rows, acts, blocks, put),
                    T5_0 => tile_t::<T5_0>(w, rows, acts, blocks, put),
                    T5_1 => tile_t::<T5_1>(w, rows, acts, blocks, put),
                    _ => tile_t::<T8_0>(w, rows, acts, blocks, put),
                }
            }
        }
    };
}

isa_kernels!(
    avx2,
    "avx2,fma,f16c",
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn mul_sum(w: __m256i, a: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
    }
);

isa_kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(crate) unsafe fn mul_sum(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
    }
);

isa_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(crate) unsafe fn mul_sum(w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
    }
);
