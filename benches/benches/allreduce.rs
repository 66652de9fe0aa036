//! All-reduce throughput of the CPU back-ends, TCP on loopback and shared memory (ranks as
//! threads of one process): 4 KB … 16 MB of f32, 2 and 4 ranks. Rank 0 is measured; the other ranks run the same collective in a loop on their
//! own threads. Reported as bytes reduced per second (criterion's GB/s).

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tessera_parallel::{Communicator, ShmHub, TcpComm};

fn all_reduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_all_reduce");
    g.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    type Group = Vec<Box<dyn Communicator>>;
    let tcp = |w| -> Group {
        TcpComm::local_group(w, Device::Cpu).expect("tcp").into_iter().map(|c| Box::new(c) as _).collect()
    };
    let shm =
        |w| -> Group { ShmHub::group(w, Device::Cpu).expect("shm").into_iter().map(|c| Box::new(c) as _).collect() };
    let backends: [(&str, &dyn Fn(usize) -> Group); 2] = [("tcp", &tcp), ("shm", &shm)];
    for (name, make) in backends {
        for world in [2usize, 4] {
            for bytes in [4usize << 10, 64 << 10, 1 << 20, 16 << 20] {
                let n = bytes / 4;
                let mut group = make(world).into_iter();
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
                g.bench_with_input(BenchmarkId::new(format!("{name}_{world}_ranks"), bytes), &t, |b, t| {
                    b.iter(|| rank0.all_reduce_sum(t).expect("all-reduce"))
                });
                drop(rank0);
                for f in followers {
                    let _ = f.join();
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, all_reduce);
criterion_main!(benches);
