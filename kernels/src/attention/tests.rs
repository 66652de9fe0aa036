//! The paged kernel on every instruction set against plain attention in f64 (gathered
//! context, explicit causal softmax), for decode and chunked prefill, GQA groups, odd head
//! sizes, scattered slots and contexts longer than one softmax chunk.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// Plain attention of one sequence in f64: `out[i, h]` = softmax over positions ≤ its own.
fn reference(q: &[f32], k: &[f32], v: &[f32], s: &SeqSpan, shape: AttnShape) -> Vec<f64> {
    let AttnShape { heads: h, kv_heads: kvn, head_dim: d, block_size: bs, window } = shape;
    let ctx = s.ctx;
    // The block table spelled out, position by position.
    let slots: Vec<usize> = (0..ctx).map(|j| s.blocks[j / bs] as usize * bs + j % bs).collect();
    let mut out = vec![0f64; s.q_len * h * d];
    for i in 0..s.q_len {
        for hh in 0..h {
            let kvh = hh / (h / kvn);
            let qv = &q[((s.q_start + i) * h + hh) * d..][..d];
            let lim = ctx - s.q_len + i + 1;
            let lo = if window == 0 { 0 } else { lim.saturating_sub(window) };
            let scores: Vec<f64> = (lo..lim)
                .map(|j| {
                    let kr = &k[(slots[j] * kvn + kvh) * d..][..d];
                    qv.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, w) in (lo..lim).zip(&e) {
                let vr = &v[(slots[j] * kvn + kvh) * d..][..d];
                for c in 0..d {
                    out[(i * h + hh) * d + c] += w / z * vr[c] as f64;
                }
            }
        }
    }
    out
}

fn case(shape: AttnShape, spans: &[(usize, usize)], rng: &mut ChaCha8Rng) {
    let AttnShape { heads: h, kv_heads: kvn, head_dim: d, block_size: bs, .. } = shape;
    let total_blocks = spans.iter().map(|s| s.1.div_ceil(bs)).sum::<usize>() + 3;
    let total_slots = total_blocks * bs;
    let k: Vec<f32> = (0..total_slots * kvn * d).map(|_| rng.random_range(-1.5f32..1.5)).collect();
    let v: Vec<f32> = (0..total_slots * kvn * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    // Each sequence gets a random, scattered block table.
    let mut free: Vec<u32> = (0..total_blocks as u32).collect();
    let mut tables = Vec::new();
    for &(_, ctx) in spans {
        let mut l = Vec::new();
        for _ in 0..ctx.div_ceil(bs) {
            l.push(free.swap_remove(rng.random_range(0..free.len())));
        }
        tables.push(l);
    }
    let rows: usize = spans.iter().map(|s| s.0).sum();
    let q: Vec<f32> = (0..rows * h * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut at = 0;
    let seqs: Vec<SeqSpan> = spans
        .iter()
        .zip(&tables)
        .map(|(&(q_len, ctx), blocks)| {
            let s = SeqSpan { q_start: at, q_len, ctx, blocks };
            at += q_len;
            s
        })
        .collect();
    let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let (k16f, v16f): (Vec<f32>, Vec<f32>) =
        (k16.iter().map(|x| x.to_f32()).collect(), v16.iter().map(|x| x.to_f32()).collect());
    for &isa in Isa::available() {
        let mut out = vec![f32::NAN; rows * h * d];
        paged_attention(isa, &q, &k, &v, &seqs, shape, &mut out).expect("attention");
        let mut out16 = vec![f32::NAN; rows * h * d];
        paged_attention(isa, &q, &k16, &v16, &seqs, shape, &mut out16).expect("f16 attention");
        for s in &seqs {
            for (got, (kk, vv)) in [(&out, (&k, &v)), (&out16, (&k16f, &v16f))] {
                let want = reference(&q, kk, vv, s, shape);
                for (e, w) in want.iter().enumerate() {
                    let g = got[s.q_start * h * d + e] as f64;
                    assert!((g - w).abs() < 2e-5, "{isa:?} {shape:?} seq {s:?} elem {e}: {g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn paged_attention_equals_plain_attention() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let smol = AttnShape { heads: 9, kv_heads: 3, head_dim: 64, block_size: 16, window: 0 };
    // Decode steps (one query each) over short and long contexts, beside a prefill chunk.
    case(smol, &[(1, 1), (1, 17), (1, 200), (5, 5), (3, 70)], &mut rng);
    // Chunked prefill: 40 new tokens after 90 cached, crossing the softmax chunk.
    case(smol, &[(40, 130)], &mut rng);
    // Odd head size, no grouping, and full multi-head grouping; blocks of 5, 1 and 64 tokens.
    case(AttnShape { heads: 4, kv_heads: 4, head_dim: 13, block_size: 5, window: 0 }, &[(2, 9), (1, 66)], &mut rng);
    case(AttnShape { heads: 8, kv_heads: 1, head_dim: 16, block_size: 1, window: 0 }, &[(17, 17)], &mut rng);
    case(AttnShape { heads: 8, kv_heads: 1, head_dim: 16, block_size: 64, window: 0 }, &[(3, 150)], &mut rng);
    // A long prefill split over several work items, and the 128-wide heads of larger models.
    case(smol, &[(200, 300), (1, 9)], &mut rng);
    case(
        AttnShape { heads: 8, kv_heads: 2, head_dim: 128, block_size: 16, window: 0 },
        &[(33, 100), (1, 65)],
        &mut rng,
    );
    // Sliding windows (Gemma 3: 256-wide heads, one KV head): decode and prefill past the
    // window, a window wider than the context, and a window inside one softmax chunk.
    let gemma = AttnShape { heads: 4, kv_heads: 1, head_dim: 256, block_size: 16, window: 40 };
    case(gemma, &[(1, 100), (30, 150), (1, 20), (70, 70)], &mut rng);
    case(AttnShape { window: 3, ..smol }, &[(9, 12), (1, 200)], &mut rng);
    case(AttnShape { heads: 4, kv_heads: 4, head_dim: 13, block_size: 5, window: 70 }, &[(2, 9), (20, 166)], &mut rng);
}

#[test]
fn bad_inputs_are_errors() {
    let shape = AttnShape { heads: 2, kv_heads: 1, head_dim: 4, block_size: 1, window: 0 };
    let (k, v) = (vec![0f32; 8], vec![0f32; 8]);
    let q = vec![0f32; 8];
    let mut out = vec![0f32; 8];
    let blocks = [0u32, 5];
    let s = [SeqSpan { q_start: 0, q_len: 1, ctx: 2, blocks: &blocks }];
    assert!(paged_attention(Isa::Scalar, &q, &k, &v, &s, shape, &mut out).is_err(), "block outside the cache");
    let s = [SeqSpan { q_start: 0, q_len: 3, ctx: 1, blocks: &blocks[..1] }];
    assert!(paged_attention(Isa::Scalar, &q, &k, &v, &s, shape, &mut out).is_err(), "more queries than context");
    let s = [SeqSpan { q_start: 0, q_len: 1, ctx: 3, blocks: &blocks }];
    assert!(paged_attention(Isa::Scalar, &q, &k, &v, &s, shape, &mut out).is_err(), "context beyond the table");
    let zero = AttnShape { block_size: 0, ..shape };
    let s = [SeqSpan { q_start: 0, q_len: 1, ctx: 1, blocks: &blocks[..1] }];
    assert!(paged_attention(Isa::Scalar, &q, &k, &v, &s, zero, &mut out).is_err(), "blocks of no tokens");
}

/// The cache write stores each row at its slot, rounded as the cache type rounds, touches
/// nothing else, and refuses a slot outside the cache.
#[test]
fn cache_rows_land_in_their_slots() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (slots, row) = ([5u32, 0, 3], 6);
    let rows: Vec<f32> = (0..slots.len() * row).map(|_| rng.random_range(-4.0..4.0)).collect();
    let mut c32 = vec![-1f32; 8 * row];
    let mut c16 = vec![f16::from_f32(-1.0); 8 * row];
    write_cache_rows(&mut c32, &rows, &slots, row).unwrap();
    write_cache_rows(&mut c16, &rows, &slots, row).unwrap();
    for s in 0..8 {
        let src = slots.iter().position(|&x| x as usize == s).map(|i| &rows[i * row..(i + 1) * row]);
        for j in 0..row {
            let want = src.map_or(-1.0, |r| r[j]);
            assert_eq!(c32[s * row + j], want, "f32 slot {s}");
            assert_eq!(c16[s * row + j], f16::from_f32(want), "f16 slot {s}");
        }
    }
    assert!(matches!(write_cache_rows(&mut c32, &rows[..row], &[8], row), Err(KernelError::Shape(_))));
    assert!(matches!(write_cache_rows(&mut c32, &rows[..row], &[1, 2], row), Err(KernelError::Shape(_))));
}

/// A query's output does not depend on the tile it is computed in: the last query of a
/// 40-token chunk (scored with its tile's transposed keys) equals the same query computed
/// alone (scored by dot products), to the bit, on every instruction set. This is what makes a
/// prompt's scores independent of how its prefill was chunked.
#[test]
fn a_query_is_computed_the_same_in_any_tile() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (d, kvn, heads) in [(64, 3, 9), (128, 2, 8)] {
        let shape = AttnShape { heads, kv_heads: kvn, head_dim: d, block_size: 16, window: 0 };
        let ctx = 150usize;
        let table: Vec<u32> = (0..ctx.div_ceil(16) as u32).rev().collect();
        let slots = table.len() * 16;
        let k: Vec<f32> = (0..slots * kvn * d).map(|_| rng.random_range(-1.5f32..1.5)).collect();
        let v: Vec<f32> = (0..slots * kvn * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let q_len = 40;
        let q: Vec<f32> = (0..q_len * heads * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let last = &q[(q_len - 1) * heads * d..];
        for &isa in Isa::available() {
            let mut chunk = vec![0f32; q.len()];
            let s = [SeqSpan { q_start: 0, q_len, ctx, blocks: &table }];
            paged_attention(isa, &q, &k, &v, &s, shape, &mut chunk).unwrap();
            let mut alone = vec![0f32; last.len()];
            let s = [SeqSpan { q_start: 0, q_len: 1, ctx, blocks: &table }];
            paged_attention(isa, last, &k, &v, &s, shape, &mut alone).unwrap();
            assert_eq!(&chunk[(q_len - 1) * heads * d..], &alone[..], "{isa:?}, head size {d}");
        }
    }
}
