//! The GEMM over [`Packed`] weights, one module per instruction set from one body: for each
//! group of 8 output columns and up to 4 activation rows, per block the codes are unpacked
//! once into eight vectors (one per group of four inputs), each activation row's block is a
//! sum of eight `u8 × i8` dot products against a broadcast group of its codes, giving the
//! integer block sums of all 8 columns in one vector; one multiply-add per block scales them
//! by `d_w · d_a`, another adds the minimum term `m_w · s_a`.
//!
//! `avx2` sums pairs with `vpmaddubsw` in 16 bits (exact for 4-bit codes: at most
//! 8·2·15·128 < 2¹⁵), so it serves Q4_0/Q4_1 only; `vnni` uses `vpdpbusd` and also serves Q8_0.

use super::packed::{Packed, GROUP};
use super::{ActBlock, QType};

macro_rules! packed_kernels {
    ($name:ident, $features:literal, $maxr:literal, $dot8:item) => {
        pub(crate) mod $name {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::{ActBlock, Packed, QType, GROUP};

            /// Σ over the 8 code vectors of `w[c]·broadcast(a[4c..4c+4])`: 8 i32 lanes, one per column.
            $dot8

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn rows<const Q8: bool, const MIN: bool, const R: usize>(
                p: &Packed,
                nb: usize,
                g: usize,
                acts: [*const ActBlock; R],
                out: [*mut f32; R],
                cols: usize,
            ) {
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut accm = [_mm256_setzero_ps(); R];
                let base = p.data.as_ptr().add(g * nb * p.stride);
                for b in 0..nb {
                    let blk = base.add(b * p.stride);
                    let d = _mm256_loadu_ps(blk as *const f32);
                    let m = _mm256_loadu_ps(blk.add(32) as *const f32);
                    let codes = blk.add(64);
                    let mut w = [_mm256_setzero_si256(); 8];
                    if Q8 {
                        for (c, wc) in w.iter_mut().enumerate() {
                            *wc = _mm256_loadu_si256(codes.add(32 * c) as *const __m256i);
                        }
                    } else {
                        for c in 0..4 {
                            let v = _mm256_loadu_si256(codes.add(32 * c) as *const __m256i);
                            w[c] = _mm256_and_si256(v, m4);
                            w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        }
                    }
                    for r in 0..R {
                        let a = &*acts[r].add(b);
                        let isum = dot8(&w, a.qs.as_ptr());
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r]);
                        // The term of the per-block offset: Q4_1's m·s (ggml's Q8_1 sum), or the
                        // symmetric types' −offset·d·(d_a·Σq).
                        let s = if MIN { a.s } else { a.d * a.isum as f32 };
                        accm[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(s), accm[r]);
                    }
                }
                for r in 0..R {
                    let v = _mm256_add_ps(acc[r], accm[r]);
                    if cols == GROUP {
                        _mm256_storeu_ps(out[r], v);
                    } else {
                        let mut tmp = [0f32; GROUP];
                        _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                        std::ptr::copy_nonoverlapping(tmp.as_ptr(), out[r], cols);
                    }
                }
            }

            #[target_feature(enable = $features)]
            unsafe fn gemm_t<const Q8: bool, const MIN: bool>(
                p: &Packed,
                groups: Range<usize>,
                acts: &[ActBlock],
                nb: usize,
                out: *mut f32,
                n: usize,
            ) {
                let m = acts.len() / nb;
                let a = |i: usize| acts.as_ptr().add(i * nb);
                for g in groups {
                    let cols = GROUP.min(n - g * GROUP);
                    let o = |i: usize| out.add(i * n + g * GROUP);
                    let mut i = 0;
                    while $maxr >= 8 && m - i >= 8 {
                        let (ai, oi): ([*const ActBlock; 8], [*mut f32; 8]) =
                            (std::array::from_fn(|r| a(i + r)), std::array::from_fn(|r| o(i + r)));
                        rows::<Q8, MIN, 8>(p, nb, g, ai, oi, cols);
                        i += 8;
                    }
                    while i < m {
                        match m - i {
                            1 => rows::<Q8, MIN, 1>(p, nb, g, [a(i)], [o(i)], cols),
                            2 => rows::<Q8, MIN, 2>(p, nb, g, [a(i), a(i + 1)], [o(i), o(i + 1)], cols),
                            3 => rows::<Q8, MIN, 3>(p, nb, g, [a(i), a(i + 1), a(i + 2)], [o(i), o(i + 1), o(i + 2)], cols),
                            _ => rows::<Q8, MIN, 4>(
                                p,
                                nb,
                                g,
                                [a(i), a(i + 1), a(i + 2), a(i + 3)],
                                [o(i), o(i + 1), o(i + 2), o(i + 3)],
                                cols,
                            ),
                        }
                        i += (m - i).min(4);
                    }
                }
            }

            /// Columns `8·groups` of `out[m, n]` from the packed weights of type `ty`.
            ///
            /// # Safety
            /// The CPU must have this module's features; `p` must be `ty`'s packing of an
            /// `n`-row matrix with `nb` blocks per row; `acts` whole rows of `nb` blocks; `out`
            /// must hold `m × n` values, of which this call writes only its groups' columns.
            pub(crate) unsafe fn gemm(
                p: &Packed,
                ty: QType,
                groups: Range<usize>,
                acts: &[ActBlock],
                nb: usize,
                out: *mut f32,
                n: usize,
            ) {
                match ty {
                    QType::Q4_1 | QType::Q4K => gemm_t::<false, true>(p, groups, acts, nb, out, n),
                    QType::Q8_0 => gemm_t::<true, false>(p, groups, acts, nb, out, n),
                    _ => gemm_t::<false, false>(p, groups, acts, nb, out, n),
                }
            }
        }
    };
}

// Up to 4 activation rows per unpacked block with AVX2's 16 vector registers, 8 with
// AVX-512's 32.
packed_kernels!(
    avx2,
    "avx2,fma,f16c",
    4,
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8(w: &[__m256i; 8], a: *const i8) -> __m256i {
        let mut s16 = _mm256_setzero_si256();
        for (c, wc) in w.iter().enumerate() {
            let av = _mm256_set1_epi32((a.add(4 * c) as *const i32).read_unaligned());
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*wc, av));
        }
        _mm256_madd_epi16(s16, _mm256_set1_epi16(1))
    }
);

packed_kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    4,
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn dot8(w: &[__m256i; 8], a: *const i8) -> __m256i {
        let mut s = _mm256_setzero_si256();
        for (c, wc) in w.iter().enumerate() {
            let av = _mm256_set1_epi32((a.add(4 * c) as *const i32).read_unaligned());
            s = _mm256_dpbusd_avx_epi32(s, *wc, av);
        }
        s
    }
);

packed_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    8,
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn dot8(w: &[__m256i; 8], a: *const i8) -> __m256i {
        let mut s = _mm256_setzero_si256();
        for (c, wc) in w.iter().enumerate() {
            let av = _mm256_set1_epi32((a.add(4 * c) as *const i32).read_unaligned());
            s = _mm256_dpbusd_epi32(s, *wc, av);
        }
        s
    }
);
