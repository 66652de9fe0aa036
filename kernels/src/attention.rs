//! Paged attention on the CPU: each sequence's queries attend over its context read in place
//! from the paged cache through its slot list (no gather, no mask tensor), with an online
//! softmax, causal for chunked prefill, the query heads of one KV head sharing every K/V row
//! load. Tasks are (sequence, KV head) pairs on the rayon pool.
//!
//! One body serves every instruction set: it is written so that the compiler vectorises it
//! (independent lanes, a polynomial `exp`), and compiled once plainly (the reference) and once
//! with AVX2+FMA enabled.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::out::Out;
use crate::{Isa, KernelError, Result};

/// One sequence of the batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// First row of its queries in the flat batch.
    pub q_start: usize,
    /// Its query tokens in this step (the last `q_len` positions of the context).
    pub q_len: usize,
    /// Cache slot of every context position (cached prefix and this step's tokens).
    pub slots: &'a [u32],
}

/// Heads and head size.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A KV cache element type.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// `dst = src` as f32.
    fn load(src: &[Self], dst: &mut [f32]);
}

impl KvElem for f32 {
    #[inline(always)]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn load(src: &[f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn load(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

/// Query vectors handled together (sharing each K/V row load).
const TILE: usize = 16;
/// Context positions scored per softmax update.
const CHUNK: usize = 64;

/// `exp(x)` for `x ≤ 0` (Cephes' polynomial; relative error below 2e-7 down to −87, where
/// the result is below 1e-37), in a form the compiler vectorises.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest through the float adder (vectorises, unlike `round`).
    let fx = (x * std::f32::consts::LOG2_E + 12582912.0) - 12582912.0;
    let r = x - fx * 0.693_359_4 - fx * -2.121_944_4e-4;
    let z = r * r;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * z + r + 1.0;
    y * f32::from_bits(((fx as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// One (sequence, KV head) task.
#[inline(always)]
fn task<E: KvElem>(q: &[f32], k: &[E], v: &[E], s: &SeqSpan, kvh: usize, shape: AttnShape, out: Out) {
    let AttnShape { heads: h, kv_heads: kvn, head_dim: d } = shape;
    let g = h / kvn;
    let ctx = s.slots.len();
    let scale = 1.0 / (d as f32).sqrt();
    let pairs = s.q_len * g;
    let mut qb = vec![0f32; TILE * d];
    let mut acc = vec![0f32; TILE * d];
    let mut sc = vec![0f32; TILE * CHUNK];
    let mut row = vec![0f32; d];
    let (mut m, mut l, mut lim) = ([f32::NEG_INFINITY; TILE], [0f32; TILE], [0usize; TILE]);
    for t0 in (0..pairs).step_by(TILE) {
        let tn = (pairs - t0).min(TILE);
        for p in 0..tn {
            let (i, hh) = ((t0 + p) / g, (t0 + p) % g);
            let at = (s.q_start + i) * h * d + (kvh * g + hh) * d;
            for (dst, src) in qb[p * d..(p + 1) * d].iter_mut().zip(&q[at..at + d]) {
                *dst = src * scale;
            }
            lim[p] = ctx - s.q_len + i + 1;
            m[p] = f32::NEG_INFINITY;
            l[p] = 0.0;
            acc[p * d..(p + 1) * d].fill(0.0);
        }
        let jmax = lim[..tn].iter().copied().max().unwrap_or(0);
        for j0 in (0..jmax).step_by(CHUNK) {
            let jn = (jmax - j0).min(CHUNK);
            for jj in 0..jn {
                let at = (s.slots[j0 + jj] as usize * kvn + kvh) * d;
                E::load(&k[at..at + d], &mut row);
                for p in 0..tn {
                    sc[p * CHUNK + jj] = dot(&qb[p * d..(p + 1) * d], &row);
                }
            }
            for p in 0..tn {
                let valid = lim[p].saturating_sub(j0).min(jn);
                let r = &mut sc[p * CHUNK..p * CHUNK + jn];
                if valid == 0 {
                    r.fill(0.0);
                    continue;
                }
                let cmax = r[..valid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mnew = m[p].max(cmax);
                let corr = if m[p] == f32::NEG_INFINITY { 0.0 } else { (m[p] - mnew).exp() };
                let mut sum = 0f32;
                for x in r[..valid].iter_mut() {
                    *x = exp_neg(*x - mnew);
                    sum += *x;
                }
                r[valid..].fill(0.0);
                l[p] = l[p] * corr + sum;
                m[p] = mnew;
                if corr != 1.0 {
                    acc[p * d..(p + 1) * d].iter_mut().for_each(|a| *a *= corr);
                }
            }
            for jj in 0..jn {
                let at = (s.slots[j0 + jj] as usize * kvn + kvh) * d;
                E::load(&v[at..at + d], &mut row);
                for p in 0..tn {
                    let w = sc[p * CHUNK + jj];
                    if w != 0.0 {
                        for (a, x) in acc[p * d..(p + 1) * d].iter_mut().zip(&row) {
                            *a += w * x;
                        }
                    }
                }
            }
        }
        for p in 0..tn {
            let (i, hh) = ((t0 + p) / g, (t0 + p) % g);
            let at = (s.q_start + i) * h * d + (kvh * g + hh) * d;
            let inv = if l[p] > 0.0 { 1.0 / l[p] } else { 0.0 };
            for (e, a) in acc[p * d..(p + 1) * d].iter().enumerate() {
                // SAFETY: each task writes only its own (rows of its sequence, heads of its KV
                // head) cells, disjoint from every other task's.
                unsafe { *out.at(at + e) = a * inv };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2<E: KvElem>(q: &[f32], k: &[E], v: &[E], s: &SeqSpan, kvh: usize, shape: AttnShape, out: Out) {
    task(q, k, v, s, kvh, shape, out)
}

/// Attention of every sequence: `q` is `[T, heads, head_dim]` f32, the caches
/// `[slots, kv_heads, head_dim]` (already holding this step's keys/values), `out` is
/// `[T, heads · head_dim]`. Rows of `out` no sequence covers are left as they are.
pub fn paged_attention<E: KvElem>(
    isa: Isa,
    q: &[f32],
    k: &[E],
    v: &[E],
    seqs: &[SeqSpan],
    shape: AttnShape,
    out: &mut [f32],
) -> Result<()> {
    let AttnShape { heads, kv_heads, head_dim } = shape;
    if kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || q.len() != out.len()
        || !q.len().is_multiple_of(heads * head_dim)
    {
        return Err(KernelError::Shape(format!(
            "attention: {heads} heads over {kv_heads} KV heads of {head_dim}, q holds {}, out {}",
            q.len(),
            out.len()
        )));
    }
    let rows = q.len() / (heads * head_dim);
    let slots = k.len() / (kv_heads * head_dim);
    for s in seqs {
        if s.q_start + s.q_len > rows || s.q_len > s.slots.len() || v.len() != k.len() {
            return Err(KernelError::Shape(format!(
                "attention: sequence rows {}..{} of {rows}, context {}",
                s.q_start,
                s.q_start + s.q_len,
                s.slots.len()
            )));
        }
        if let Some(bad) = s.slots.iter().find(|&&x| x as usize >= slots) {
            return Err(KernelError::Shape(format!("attention: slot {bad} outside the cache's {slots}")));
        }
    }
    let o = Out(out.as_mut_ptr());
    let run = |(si, kvh): (usize, usize)| {
        let s = &seqs[si];
        match isa {
            // SAFETY: AVX2+FMA+F16C are present when `Isa::available` lists an x86 SIMD path.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { task_avx2(q, k, v, s, kvh, shape, o) },
            _ => task(q, k, v, s, kvh, shape, o),
        }
    };
    if !Isa::available().contains(&isa) {
        return Err(KernelError::Unsupported(format!("{isa:?} is not available on this CPU")));
    }
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..kv_heads).map(move |h| (s, h))).collect();
    if tasks.len() == 1 {
        run(tasks[0]);
    } else {
        tasks.into_par_iter().for_each(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
