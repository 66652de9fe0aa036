//! LoRA's low-rank update, row by row: for each row of a batch that runs on an adapter,
//! `y[row, off..off + w] += (A · x[row]) · (scale·Bᵀ)` for each of the adapter's projections
//! writing into `y` (several projections of one fused output — q/k/v, gate/up — each at its
//! column offset). One pass over the rows, no gathers or scatters of other rows; rows are
//! independent, split over the pool when there is enough work.
//!
//! As elsewhere, one body serves every instruction set: compiled plainly it is the
//! reference, and once more with AVX2+FMA, where the compiler vectorises it.

use rayon::prelude::*;

use crate::math::{dot, fma};
use crate::{Isa, KernelError, Result};

/// Multiply-adds below which a call stays on the calling thread.
const PARALLEL_MIN: usize = 256 * 1024;

/// One adapted projection: `a` is `A`, `[rank, inp]`; `bt` is `scale·Bᵀ`, `[rank, w]`; its
/// outputs land at columns `offset..offset + w` of `y`.
#[derive(Debug, Clone, Copy)]
pub struct LoraUpdate<'a> {
    pub a: &'a [f32],
    pub bt: &'a [f32],
    pub rank: usize,
    pub offset: usize,
}

/// Apply `updates[g]` to every row `t` of `y` (`[rows, out]`) with `group[t] == Some(g)`,
/// reading `x` (`[rows, inp]`).
pub fn lora_add(
    isa: Isa,
    x: &[f32],
    inp: usize,
    y: &mut [f32],
    out: usize,
    group: &[Option<usize>],
    updates: &[Vec<LoraUpdate>],
) -> Result<()> {
    let rows = group.len();
    if x.len() != rows * inp || y.len() != rows * out {
        return Err(KernelError::Shape(format!(
            "LoRA update of {rows} rows: x holds {} values for {inp} inputs, y {} for {out} outputs",
            x.len(),
            y.len()
        )));
    }
    let mut work = 0;
    for u in updates.iter().flatten() {
        let w = u.bt.len().checked_div(u.rank).unwrap_or(0);
        if u.rank == 0 || u.a.len() != u.rank * inp || u.bt.len() != u.rank * w || u.offset + w > out {
            return Err(KernelError::Shape(format!(
                "LoRA factors of rank {}: A holds {} values for {inp} inputs, Bᵀ {} for outputs at {}.. of {out}",
                u.rank,
                u.a.len(),
                u.bt.len(),
                u.offset
            )));
        }
        work += u.rank * (inp + w);
    }
    if let Some(g) = group.iter().flatten().find(|&&g| g >= updates.len()) {
        return Err(KernelError::Shape(format!("row of adapter group {g}, of {}", updates.len())));
    }
    isa.ensure_available()?;
    if out == 0 {
        return Ok(());
    }
    let run = |(t, yr): (usize, &mut [f32])| {
        let Some(g) = group[t] else { return };
        let xr = &x[t * inp..(t + 1) * inp];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: checked above that the CPU has this instruction set (AVX2+FMA at least).
            Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni => unsafe { row_avx2(xr, yr, &updates[g]) },
            _ => row::<false>(xr, yr, &updates[g]),
        }
    };
    if rows * work / updates.len().max(1) >= PARALLEL_MIN {
        y.par_chunks_mut(out).enumerate().for_each(run);
    } else {
        y.chunks_mut(out).enumerate().for_each(run);
    }
    Ok(())
}

#[inline(always)]
fn row<const X: bool>(x: &[f32], y: &mut [f32], updates: &[LoraUpdate]) {
    let inp = x.len();
    for u in updates {
        let w = u.bt.len() / u.rank;
        let yr = &mut y[u.offset..u.offset + w];
        for j in 0..u.rank {
            let s = dot::<X>(&u.a[j * inp..(j + 1) * inp], x);
            for (o, &b) in yr.iter_mut().zip(&u.bt[j * w..(j + 1) * w]) {
                *o = fma::<X>(s, b, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(x: &[f32], y: &mut [f32], updates: &[LoraUpdate]) {
    row::<true>(x, y, updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instruction_set_matches_the_plain_product_and_leaves_other_rows_alone() {
        let (rows, inp, out, r) = (5, 37, 20, 3);
        let val = |i: usize| ((i * 7919) % 103) as f32 / 51.5 - 1.0;
        let x: Vec<f32> = (0..rows * inp).map(val).collect();
        let a: Vec<f32> = (0..r * inp).map(|i| val(i + 11)).collect();
        let bt: Vec<f32> = (0..r * 8).map(|i| val(i + 5)).collect();
        let a2: Vec<f32> = (0..r * inp).map(|i| val(i + 3)).collect();
        let bt2: Vec<f32> = (0..r * 12).map(|i| val(i + 7)).collect();
        let updates = vec![
            vec![
                LoraUpdate { a: &a, bt: &bt, rank: r, offset: 0 },
                LoraUpdate { a: &a2, bt: &bt2, rank: r, offset: 8 },
            ],
            vec![LoraUpdate { a: &a2, bt: &bt, rank: r, offset: 12 }],
        ];
        let group = [Some(0), None, Some(1), Some(0), None];
        // The plain product, by hand.
        let mut want: Vec<f32> = (0..rows * out).map(|i| i as f32).collect();
        for (t, g) in group.iter().enumerate() {
            let Some(g) = g else { continue };
            for u in &updates[*g] {
                let w = u.bt.len() / u.rank;
                for j in 0..u.rank {
                    let s: f32 = (0..inp).map(|i| u.a[j * inp + i] * x[t * inp + i]).sum();
                    for c in 0..w {
                        want[t * out + u.offset + c] += s * u.bt[j * w + c];
                    }
                }
            }
        }
        for isa in Isa::available() {
            let mut y: Vec<f32> = (0..rows * out).map(|i| i as f32).collect();
            lora_add(*isa, &x, inp, &mut y, out, &group, &updates).unwrap();
            let d = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(d < 1e-4, "{isa:?}: max |Δ| {d}");
            for t in [1, 4] {
                assert!((0..out).all(|c| y[t * out + c] == (t * out + c) as f32), "{isa:?}: row {t} untouched");
            }
        }
        let bad = [LoraUpdate { a: &a, bt: &bt, rank: r, offset: 15 }];
        let e = lora_add(Isa::Scalar, &x, inp, &mut vec![0.0; rows * out], out, &group, &[bad.to_vec(), vec![]]);
        assert!(e.is_err(), "outputs past the row are refused");
    }
}
