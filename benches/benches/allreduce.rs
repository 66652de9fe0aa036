//! All-reduce throughput of the CPU (TCP) back-end: 4 KB … 16 MB of f32, 2 and 4 ranks on
//! loopback. Rank 0 is measured; the other ranks run the same collective in a loop on their
//! own threads. Reported as bytes reduced per second (criterion's GB/s).

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tessera_parallel::{Communicator, TcpComm};

fn all_reduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_all_reduce");
    g.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for world in [2usize, 4] {
        for bytes in [4usize << 10, 64 << 10, 1 << 20, 16 << 20] {
            let n = bytes / 4;
            let mut group = TcpComm::local_group(world, Device::Cpu).expect("rank group").into_iter();
            let rank0 = group.next().expect("rank 0");
            let followers: Vec<_> = group
                .map(|comm| {
                    std::thread::spawn(move || {
                        let t = Tensor::ones(n, DType::F32, &Device::Cpu).expect("tensor");
                        // Runs until rank 0 goes away (the collective then fails).
                        while comm.all_reduce_sum(&t).is_ok() {}
                    })
                })
                .collect();
            let t = Tensor::ones(n, DType::F32, &Device::Cpu).expect("tensor");
            g.throughput(Throughput::Bytes(bytes as u64));
            g.bench_with_input(BenchmarkId::new(format!("{world}_ranks"), bytes), &t, |b, t| {
                b.iter(|| rank0.all_reduce_sum(t).expect("all-reduce"))
            });
            drop(rank0);
            for f in followers {
                let _ = f.join();
            }
        }
    }
    g.finish();
}

criterion_group!(benches, all_reduce);
criterion_main!(benches);
