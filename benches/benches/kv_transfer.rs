//! Prefill/decode KV transfer on loopback: a decode worker's pull of 16, 64 and 256 blocks
//! of SmolLM2-135M's KV (30 layers, 3 KV heads of 64, f16, 16-token blocks: 360 KiB a block)
//! from a prefill worker's transfer service into its own cache, both real `KvCache`s.
//! Throughput is KV bytes moved per pull (handshake, one-shot token, CRC checks included).

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tessera_engine::kv::transfer::{client, new_token, server, KvLayout, Pin, Pins, RemoteSource};
use tessera_engine::EngineStats;
use tessera_models::KvCache;

const BLOCKS: usize = 512;

fn filled_cache() -> KvCache {
    let c = KvCache::new(30, BLOCKS, 16, 3, 64, DType::F16, &Device::Cpu).expect("cache");
    for l in 0..30 {
        for t in [&c.layer(l).0, &c.layer(l).1] {
            let r = Tensor::randn(0f32, 1.0, (BLOCKS * 16, 3, 64), &Device::Cpu).and_then(|r| r.to_dtype(DType::F16));
            t.slice_set(&r.expect("random"), 0, 0).expect("fill");
        }
    }
    c
}

fn transfer(c: &mut Criterion) {
    let layout = KvLayout {
        model: "llama hidden 576".into(),
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        dtype: "f16".into(),
        block_size: 16,
        tp_size: 1,
        pp_size: 1,
        rope_interleaved: true,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let pins = Arc::new(Pins::default());
    let src = filled_cache();
    server::start(
        listener,
        server::Service {
            engine_id: "prefill".into(),
            layout: layout.clone(),
            store: Arc::new(src.clone()),
            pins: pins.clone(),
            stats: Arc::new(EngineStats::new(BLOCKS, 16)),
            unpin: Box::new(|_| {}),
        },
    );
    let dst = KvCache::new(30, BLOCKS, 16, 3, 64, DType::F16, &Device::Cpu).expect("cache");
    let mut g = c.benchmark_group("kv_transfer_loopback");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for n in [16usize, 64, 256] {
        let remote: Vec<u32> = (0..n as u32).map(|b| b * 2).collect();
        let local: Vec<u32> = (0..n as u32).collect();
        g.throughput(Throughput::Bytes((2 * 30 * n * src.block_bytes()) as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let token = new_token();
                let deadline = Instant::now() + Duration::from_secs(60);
                pins.insert(token.clone(), Pin { seq: 1, blocks: remote.clone(), num_tokens: n * 16, deadline });
                let s = RemoteSource {
                    host: "127.0.0.1".into(),
                    port,
                    engine_id: None,
                    block_ids: remote.clone(),
                    token,
                    num_tokens: n * 16,
                };
                client::pull(&s, &remote, &local, &layout, &dst, Duration::from_secs(30)).expect("pull")
            })
        });
    }
    g.finish();
    // The copy is exact.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    src.read_blocks(7, &[2], &mut a).expect("read");
    dst.read_blocks(7, &[1], &mut b).expect("read");
    assert_eq!(a, b);
}

criterion_group!(benches, transfer);
criterion_main!(benches);
