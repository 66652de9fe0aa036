//! Element-wise kernels worth fusing on the CPU: the gated MLP's `silu(gate) · up`, read
//! straight from the rows of the fused gate/up projection (no split copies, one pass, a
//! polynomial `exp`), rows split over the pool when there are many.
//!
//! As in attention, one body serves every instruction set: compiled plainly it is the
//! reference, and once more with AVX2+FMA, where the compiler vectorises it.

use rayon::prelude::*;

use crate::math::{exp_neg, fma};
use crate::{Isa, KernelError, Result};

/// Below this many outputs a call stays on the calling thread (waking the pool costs more).
const PARALLEL_MIN: usize = 32 * 1024;

/// `out[r, j] = silu(gu[r, j]) · gu[r, inter + j]` for `rows` rows of `gu` laid out as
/// `[gate (inter) | up (inter)]`, on instruction set `isa`.
pub fn silu_mul(isa: Isa, gu: &[f32], rows: usize, inter: usize, out: &mut [f32]) -> Result<()> {
    if gu.len() != rows * 2 * inter || out.len() != rows * inter {
        return Err(KernelError::Shape(format!(
            "silu·mul of {rows} rows of 2×{inter}: input holds {} values, output {}",
            gu.len(),
            out.len()
        )));
    }
    isa.ensure_available()?;
    if inter == 0 {
        return Ok(());
    }
    let run = |(g, o): (&[f32], &mut [f32])| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: checked above that the CPU has this instruction set (AVX2+FMA at least).
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni => unsafe { row_avx2(g, o) },
        _ => row::<false>(g, o),
    };
    if rows * inter >= PARALLEL_MIN {
        gu.par_chunks(2 * inter).zip(out.par_chunks_mut(inter)).for_each(run);
    } else {
        gu.chunks(2 * inter).zip(out.chunks_mut(inter)).for_each(run);
    }
    Ok(())
}

/// One row: `silu(g) = g · σ(g)`, with `σ` from `exp(−|g|)` so that `exp` never overflows.
#[inline(always)]
fn row<const X: bool>(gu: &[f32], out: &mut [f32]) {
    let (gate, up) = gu.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let e = exp_neg::<X>(-g.abs());
        let sig = (if g >= 0.0 { 1.0 } else { e }) / (1.0 + e);
        *o = fma::<X>(g * sig, u, 0.0);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(gu: &[f32], out: &mut [f32]) {
    row::<true>(gu, out)
}

/// The residual stream's step between sub-layers, in one pass per row: `x_out = x + delta`
/// and `h = rms_norm(x_out) · w` (`eps` inside the root), for `rows` rows of `w.len()` values.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    isa: Isa,
    x: &[f32],
    delta: &[f32],
    w: &[f32],
    eps: f32,
    x_out: &mut [f32],
    h: &mut [f32],
) -> Result<()> {
    let dim = w.len();
    if dim == 0 || !x.len().is_multiple_of(dim) || [delta.len(), x_out.len(), h.len()].iter().any(|&l| l != x.len()) {
        return Err(KernelError::Shape(format!(
            "add+RMSNorm over rows of {dim}: x {}, delta {}, outputs {} and {}",
            x.len(),
            delta.len(),
            x_out.len(),
            h.len()
        )));
    }
    isa.ensure_available()?;
    for (((x, d), xo), h) in x.chunks(dim).zip(delta.chunks(dim)).zip(x_out.chunks_mut(dim)).zip(h.chunks_mut(dim)) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: checked above that the CPU has this instruction set (AVX2+FMA at least).
            Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni => unsafe { add_norm_row_avx2(x, d, w, eps, xo, h) },
            _ => add_norm_row::<false>(x, d, w, eps, xo, h),
        }
    }
    Ok(())
}

#[inline(always)]
fn add_norm_row<const X: bool>(x: &[f32], d: &[f32], w: &[f32], eps: f32, xo: &mut [f32], h: &mut [f32]) {
    // Eight partial sums of squares (vectorises; a single running sum would not).
    let mut part = [0f32; 8];
    for (i, ((o, &a), &b)) in xo.iter_mut().zip(x).zip(d).enumerate() {
        *o = a + b;
        part[i % 8] = fma::<X>(*o, *o, part[i % 8]);
    }
    let ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    let scale = 1.0 / (ss / w.len() as f32 + eps).sqrt();
    for ((h, &v), &g) in h.iter_mut().zip(xo.iter()).zip(w) {
        *h = v * scale * g;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_norm_row_avx2(x: &[f32], d: &[f32], w: &[f32], eps: f32, xo: &mut [f32], h: &mut [f32]) {
    add_norm_row::<true>(x, d, w, eps, xo, h)
}

/// ggml's GELU table: for every f16 bit pattern, GELU-tanh of that value rounded to f16
/// (as f32), computed with ggml's formula.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const GELU_COEF_A: f32 = 0.044715;
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                let g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh());
                half::f16::from_f32(g).to_f32()
            })
            .collect()
    })
}

/// `out[r, j] = gelu(gu[r, j]) · gu[r, inter + j]` as ggml computes its GeGLU on the CPU:
/// the gate rounded to f16 and looked up in [`gelu_table`] (0 below −10, the gate itself
/// from 10 on). llama.cpp's result for GGUF models, to the bit.
pub fn gelu_mul_ggml(gu: &[f32], rows: usize, inter: usize, out: &mut [f32]) -> Result<()> {
    if gu.len() != rows * 2 * inter || out.len() != rows * inter {
        return Err(KernelError::Shape(format!(
            "gelu·mul of {rows} rows of 2×{inter}: input holds {} values, output {}",
            gu.len(),
            out.len()
        )));
    }
    if inter == 0 {
        return Ok(());
    }
    let table = gelu_table();
    let run = |(row, o): (&[f32], &mut [f32])| {
        let (gate, up) = row.split_at(inter);
        for ((o, &x), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x * u
            } else {
                table[half::f16::from_f32(x).to_bits() as usize] * u
            };
        }
    };
    if rows * inter >= PARALLEL_MIN {
        gu.par_chunks(2 * inter).zip(out.par_chunks_mut(inter)).for_each(run);
    } else {
        gu.chunks(2 * inter).zip(out.chunks_mut(inter)).for_each(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 24.0
            })
            .collect()
    }

    /// Every instruction set against the naive formula (std's `exp`), over odd widths, one
    /// row and many (the parallel split), and inputs out to ±12 where σ saturates.
    #[test]
    fn silu_mul_matches_the_naive_formula() {
        for (rows, inter) in [(1, 1), (1, 7), (3, 33), (5, 576), (33, 1536)] {
            let gu = rand(rows * 2 * inter, (rows * 31 + inter) as u64);
            let want: Vec<f32> = (0..rows * inter)
                .map(|i| {
                    let (r, j) = (i / inter, i % inter);
                    let (g, u) = (gu[r * 2 * inter + j] as f64, gu[r * 2 * inter + inter + j] as f64);
                    (g / (1.0 + (-g).exp()) * u) as f32
                })
                .collect();
            for &isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * inter];
                silu_mul(isa, &gu, rows, inter, &mut got).unwrap();
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{isa:?} {rows}×{inter} at {i}: {a} vs {b}");
                }
            }
        }
    }

    /// Every instruction set against the naive formula in f64, over odd widths.
    #[test]
    fn add_rms_norm_matches_the_naive_formula() {
        for (rows, dim) in [(1, 1), (2, 7), (3, 64), (33, 576)] {
            let (x, d, w) = (rand(rows * dim, 1), rand(rows * dim, 2), rand(dim, 3));
            let eps = 1e-5f32;
            for &isa in Isa::available() {
                let (mut xo, mut h) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows * dim]);
                add_rms_norm(isa, &x, &d, &w, eps, &mut xo, &mut h).unwrap();
                for r in 0..rows {
                    let sum: Vec<f64> = (0..dim).map(|j| x[r * dim + j] as f64 + d[r * dim + j] as f64).collect();
                    let ms = sum.iter().map(|v| v * v).sum::<f64>() / dim as f64;
                    let scale = 1.0 / (ms + eps as f64).sqrt();
                    for j in 0..dim {
                        let (want_x, want_h) = (sum[j], sum[j] * scale * w[j] as f64);
                        assert_eq!(xo[r * dim + j], want_x as f32, "{isa:?} sum at {r},{j}");
                        let got = h[r * dim + j] as f64;
                        assert!(
                            (got - want_h).abs() <= 1e-5 * want_h.abs().max(1.0),
                            "{isa:?} {r},{j}: {got} vs {want_h}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_refuses_wrong_lengths() {
        let mut out = vec![0f32; 4];
        assert!(matches!(silu_mul(Isa::Scalar, &[0.0; 7], 1, 4, &mut out), Err(KernelError::Shape(_))));
    }

    /// ggml's GeGLU: GELU-tanh within f16 rounding (2e-3 of the result or of 1), exact at the
    /// edges, and the table's f16 rounding visible (not an f32 GELU).
    #[test]
    fn ggml_gelu_mul_rounds_through_f16_like_ggml() {
        let gelu = |x: f32| 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044715 * x * x)).tanh());
        let xs: Vec<f32> = (0..4000).map(|i| -12.0 + i as f32 * 0.006_03).collect();
        let inter = xs.len();
        let mut gu = xs.clone();
        gu.extend(std::iter::repeat_n(2.0f32, inter));
        let mut out = vec![0f32; inter];
        gelu_mul_ggml(&gu, 1, inter, &mut out).unwrap();
        let mut rounded = 0;
        for (x, o) in xs.iter().zip(&out) {
            let want = 2.0 * gelu(*x);
            match *x {
                x if x <= -10.0 => assert_eq!(*o, 0.0),
                x if x >= 10.0 => assert_eq!(*o, 2.0 * x),
                x => {
                    let h = half::f16::from_f32(x).to_f32();
                    let table = 2.0 * half::f16::from_f32(gelu(h)).to_f32();
                    assert_eq!(*o, table, "x = {x}");
                    assert!((o - want).abs() <= 2e-3 * want.abs().max(1.0), "x = {x}: {o} vs {want}");
                    rounded += usize::from(*o != want);
                }
            }
        }
        assert!(rounded > 1000, "the f16 rounding shows ({rounded} values differ from an f32 GELU)");
    }
}
