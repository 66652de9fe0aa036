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
    if !Isa::available().contains(&isa) {
        return Err(KernelError::Unsupported(format!("{isa:?} is not available on this CPU")));
    }
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

    #[test]
    fn silu_mul_refuses_wrong_lengths() {
        let mut out = vec![0f32; 4];
        assert!(matches!(silu_mul(Isa::Scalar, &[0.0; 7], 1, 4, &mut out), Err(KernelError::Shape(_))));
    }
}
