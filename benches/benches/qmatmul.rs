//! Quantized matmul, per GGUF type and activation rows m ∈ {1, 8, 32, 128}: our kernel on the
//! active instruction set vs our scalar reference vs candle's `QMatMul`, on a
//! [1536, 576]-shaped weight (SmolLM2's gate/up; k = 576 is 18 blocks, not a multiple of 256)
//! for the 32-element types and a [576, 1536] one (its down projection) for the K-quants.
//! Throughput is reported in weight bytes read per call (GB/s); GFLOP/s = 2·m·n·k / time.

use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tessera_kernels::{Isa, QMatrix, QType};

fn qmatmul(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("qmatmul");
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    eprintln!("kernels: {}", Isa::active().describe());
    for (gt, qt) in [
        (GgmlDType::Q4_0, QType::Q4_0),
        (GgmlDType::Q4_1, QType::Q4_1),
        (GgmlDType::Q5_0, QType::Q5_0),
        (GgmlDType::Q8_0, QType::Q8_0),
        (GgmlDType::Q4K, QType::Q4K),
        (GgmlDType::Q5K, QType::Q5K),
        (GgmlDType::Q6K, QType::Q6K),
    ] {
        let (n, k) = if qt.is_k() { (576usize, 1536usize) } else { (1536, 576) };
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("weights");
        let q = QTensor::quantize(&w, gt).expect("quantize");
        let ours = QMatrix::new(qt, n, k, q.data().expect("bytes").to_vec()).expect("matrix");
        let candle = QMatMul::from_qtensor(q).expect("qmatmul");
        let bytes = (n * k / qt.block_elems() * qt.block_bytes()) as u64;
        for m in [1usize, 8, 32, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("x");
            let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("x values");
            let mut out = vec![0f32; m * n];
            g.throughput(Throughput::Bytes(bytes));
            let id = |what: &str| BenchmarkId::new(format!("{qt:?}/{what}"), m);
            g.bench_function(id(&format!("{:?}", Isa::active())), |b| {
                b.iter(|| ours.matmul(&xs, m, &mut out).expect("ours"))
            });
            g.bench_function(id("scalar"), |b| {
                b.iter(|| ours.matmul_on(Isa::Scalar, &xs, m, &mut out).expect("scalar"))
            });
            g.bench_function(id("candle"), |b| b.iter(|| candle.forward(&x).expect("candle")));
        }
    }
    g.finish();
}

criterion_group!(benches, qmatmul);
criterion_main!(benches);
