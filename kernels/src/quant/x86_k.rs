//! x86-64 SIMD dot products for the K-quants against Q8_K activations, one module per
//! instruction set from one body (the integer product `mul_sum` comes from [`super::x86`]).
//!
//! A super-block's 256 codes are unpacked once into eight vectors of 32 unsigned codes and
//! reused for up to four activation rows. Per super-block the sums stay integer (each
//! sub-block's product times its scale, in i32 lanes); the minimum's term comes from Q8_K's
//! `bsums`; one f32 multiply-add per super-block and row scales them.

use super::{kquant::scale_min_k4, ActBlockK, QMatrix, QType};

const T4K: u8 = 0;
const T5K: u8 = 1;
const T6K: u8 = 2;

macro_rules! isa_kernels_k {
    ($name:ident, $features:literal) => {
        pub(crate) mod $name {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::super::x86::$name::{half, hsum, mul_sum};
            use super::{scale_min_k4, ActBlockK, QMatrix, QType, T4K, T5K, T6K};

            /// The 256 codes of one super-block as 8 × 32 unsigned bytes, with the scale of
            /// each 16 codes (lanes 0–3 and 4–7 of a product) and the minimum of each 32.
            struct Unpacked {
                w: [__m256i; 8],
                scale: [__m256i; 8],
                min: [i32; 16],
                d: f32,
                dmin: f32,
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn unpack<const T: u8>(b: *const u8) -> Unpacked {
                let m4 = _mm256_set1_epi8(0x0F);
                let mut u = Unpacked {
                    w: [_mm256_setzero_si256(); 8],
                    scale: [_mm256_setzero_si256(); 8],
                    min: [0; 16],
                    d: 0.0,
                    dmin: 0.0,
                };
                if T == T6K {
                    u.d = half(b.add(208));
                    let sc = std::slice::from_raw_parts(b.add(192) as *const i8, 16);
                    for s in 0..8 {
                        u.scale[s] =
                            _mm256_set_m128i(_mm_set1_epi32(sc[2 * s + 1] as i32), _mm_set1_epi32(sc[2 * s] as i32));
                        // The codes are stored +32: Σ scale·(c − 32)·q = Σ scale·c·q − 32·Σ scale·bsum.
                        u.min[2 * s] = 32 * sc[2 * s] as i32;
                        u.min[2 * s + 1] = 32 * sc[2 * s + 1] as i32;
                    }
                    u.dmin = u.d;
                    let m2 = _mm256_set1_epi8(0x30);
                    for h in 0..2 {
                        let ql0 = _mm256_loadu_si256(b.add(64 * h) as *const __m256i);
                        let ql1 = _mm256_loadu_si256(b.add(64 * h + 32) as *const __m256i);
                        let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                        let h0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2);
                        let h1 = _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2);
                        let h2 = _mm256_and_si256(qh, m2);
                        let h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2);
                        u.w[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), h0);
                        u.w[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), h1);
                        u.w[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h2);
                        u.w[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h3);
                    }
                } else {
                    u.d = half(b);
                    u.dmin = half(b.add(2));
                    let scales = std::slice::from_raw_parts(b.add(4), 12);
                    let (qs, qh) = if T == T4K { (b.add(16), None) } else { (b.add(48), Some(b.add(16))) };
                    let qhv = qh.map(|p| _mm256_loadu_si256(p as *const __m256i));
                    let one = _mm256_set1_epi8(1);
                    for s in 0..8 {
                        let (sc, m) = scale_min_k4(s, scales);
                        u.scale[s] = _mm256_set1_epi32(sc as i32);
                        u.min[2 * s] = m as i32;
                        u.min[2 * s + 1] = m as i32;
                        let v = _mm256_loadu_si256(qs.add(32 * (s / 2)) as *const __m256i);
                        let nib = if s % 2 == 0 { v } else { _mm256_srli_epi16(v, 4) };
                        let mut w = _mm256_and_si256(nib, m4);
                        if let Some(h) = qhv {
                            let bit = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(s as i32)), one);
                            w = _mm256_or_si256(w, _mm256_slli_epi16(bit, 4));
                        }
                        u.w[s] = w;
                    }
                }
                u
            }

            /// One weight row (`nb` super-blocks of type `T`) against `R` Q8_K rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dots<const T: u8, const R: usize>(
                row: *const u8,
                nb: usize,
                acts: [*const ActBlockK; R],
            ) -> [f32; R] {
                let bb = match T {
                    T4K => 144,
                    T5K => 176,
                    _ => 210,
                };
                let mut acc = [_mm256_setzero_ps(); R];
                let mut extra = [0f32; R];
                for b in 0..nb {
                    let u = unpack::<T>(row.add(b * bb));
                    for r in 0..R {
                        let a = &*acts[r].add(b);
                        let mut isum = _mm256_setzero_si256();
                        for s in 0..8 {
                            let av = _mm256_loadu_si256(a.qs.as_ptr().add(32 * s) as *const __m256i);
                            let p = mul_sum(u.w[s], av);
                            isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(p, u.scale[s]));
                        }
                        let imin: i32 = (0..16).map(|g| u.min[g] * a.bsums[g] as i32).sum();
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(u.d * a.d), _mm256_cvtepi32_ps(isum), acc[r]);
                        extra[r] -= u.dmin * a.d * imin as f32;
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
                acts: &[ActBlockK],
                blocks: usize,
                put: &mut dyn FnMut(usize, usize, f32),
            ) {
                crate::drive_1xr!(dots, T, w, rows, acts, blocks, put);
            }

            /// Rows `rows` of a K-quant `w` times every Q8_K activation row.
            ///
            /// # Safety
            /// The CPU must have the features this module is compiled for, `w` must be a
            /// K-quant and `acts` must hold whole rows of `w.cols() / 256` super-blocks.
            pub(crate) unsafe fn tile(
                w: &QMatrix,
                rows: Range<usize>,
                acts: &[ActBlockK],
                blocks: usize,
                put: &mut dyn FnMut(usize, usize, f32),
            ) {
                match w.qtype() {
                    QType::Q4K => tile_t::<T4K>(w, rows, acts, blocks, put),
                    QType::Q5K => tile_t::<T5K>(w, rows, acts, blocks, put),
                    _ => tile_t::<T6K>(w, rows, acts, blocks, put),
                }
            }
        }
    };
}

isa_kernels_k!(avx2, "avx2,fma,f16c");
isa_kernels_k!(avxvnni, "avx2,fma,f16c,avxvnni");
isa_kernels_k!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni");
