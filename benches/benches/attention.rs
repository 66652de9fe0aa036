//! Paged attention over an f16 cache with SmolLM2-135M's heads (9 query heads, 3 KV heads,
//! 64 dims): 32 sequences decoding one token each at contexts of 128 and 1024, their blocks
//! interleaved as an allocator serving them together leaves them, and one 512-token causal prefill; our kernel on the
//! active instruction set vs the scalar reference. Throughput is KV bytes read per call.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use tessera_kernels::{paged_attention, AttnShape, Isa, SeqSpan};

fn attention(c: &mut Criterion) {
    let shape = AttnShape { heads: 9, kv_heads: 3, head_dim: 64, block_size: 16, window: 0 };
    let (seqs, block) = (32usize, 16usize);
    let mut g = c.benchmark_group("paged_attention");
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    for ctx in [128usize, 1024] {
        let blocks_per_seq = ctx / block;
        let total_slots = seqs * ctx;
        let row = shape.kv_heads * shape.head_dim;
        let val = |i: usize| f16::from_f32(((i * 7919 % 1000) as f32 / 500.0) - 1.0);
        let k: Vec<f16> = (0..total_slots * row).map(val).collect();
        let v: Vec<f16> = (0..total_slots * row).map(|i| val(i + 13)).collect();
        // Interleave the sequences' blocks, as an allocator serving them together would.
        let tables: Vec<Vec<u32>> =
            (0..seqs).map(|s| (0..blocks_per_seq).map(|b| (b * seqs + s) as u32).collect()).collect();
        debug_assert!(blocks_per_seq * seqs * block == total_slots);
        let spans: Vec<SeqSpan> =
            tables.iter().enumerate().map(|(i, t)| SeqSpan { q_start: i, q_len: 1, ctx, blocks: t }).collect();
        let q: Vec<f32> = (0..seqs * shape.heads * shape.head_dim).map(|i| (i % 17) as f32 / 17.0).collect();
        let mut out = vec![0f32; q.len()];
        g.throughput(Throughput::Bytes((2 * total_slots * row * 2) as u64));
        for isa in [Isa::active(), Isa::Scalar] {
            g.bench_function(BenchmarkId::new(format!("decode32/{isa:?}"), ctx), |b| {
                b.iter(|| paged_attention(isa, &q, &k, &v, &spans, shape, &mut out).expect("attention"))
            });
        }
    }
    // One sequence's 512-token prompt in one step (causal).
    let ctx = 512usize;
    let row = shape.kv_heads * shape.head_dim;
    let k: Vec<f16> = (0..ctx * row).map(|i| f16::from_f32(((i * 7919 % 1000) as f32 / 500.0) - 1.0)).collect();
    let v = k.clone();
    let table: Vec<u32> = (0..ctx.div_ceil(block) as u32).collect();
    let spans = [SeqSpan { q_start: 0, q_len: ctx, ctx, blocks: &table }];
    let q: Vec<f32> = (0..ctx * shape.heads * shape.head_dim).map(|i| (i % 17) as f32 / 17.0).collect();
    let mut out = vec![0f32; q.len()];
    g.throughput(Throughput::Bytes((2 * ctx * row * 2) as u64));
    for isa in [Isa::active(), Isa::Scalar] {
        g.bench_function(BenchmarkId::new(format!("prefill/{isa:?}"), ctx), |b| {
            b.iter(|| paged_attention(isa, &q, &k, &v, &spans, shape, &mut out).expect("attention"))
        });
    }
    g.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
