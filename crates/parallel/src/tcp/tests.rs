//! The behaviour every CPU back-end shares, checked on TCP and shared memory alike.

use super::*;
use crate::ShmHub;

/// Builds a group of `world` ranks of one back-end.
type Make = fn(usize) -> Vec<Box<dyn Communicator>>;

fn tcp(world: usize) -> Vec<Box<dyn Communicator>> {
    let g = TcpComm::local_group(world, Device::Cpu).expect("tcp group");
    g.into_iter().map(|c| Box::new(c) as Box<dyn Communicator>).collect()
}

fn shm(world: usize) -> Vec<Box<dyn Communicator>> {
    let g = ShmHub::group(world, Device::Cpu).expect("shm group");
    g.into_iter().map(|c| Box::new(c) as Box<dyn Communicator>).collect()
}

const BACKENDS: [(&str, Make); 2] = [("tcp", tcp), ("shm", shm)];

/// Run `f` on every rank of a group of `world`, one thread per rank.
fn on_ranks<T: Send + 'static>(
    make: Make,
    world: usize,
    f: impl Fn(&dyn Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let group = make(world);
    let f = std::sync::Arc::new(f);
    // Every rank keeps its links open until all ranks are done: a rank that closed its
    // sockets while a peer still read from them could cut that peer's last message short.
    let done = std::sync::Arc::new(std::sync::Barrier::new(world));
    let hs: Vec<_> = group
        .into_iter()
        .map(|c| {
            let (f, done) = (f.clone(), done.clone());
            std::thread::spawn(move || {
                // A rank that fails still reaches the barrier, so the others do not wait forever.
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c.as_ref())));
                done.wait();
                out.unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn all_reduce_gather_scatter_on_2_3_and_4_ranks() {
    for ((name, make), world) in BACKENDS.into_iter().flat_map(|b| [2, 3, 4].map(|w| (b, w))) {
        // 7 elements: parts are uneven for 2, 3 and 4 ranks.
        let out = on_ranks(make, world, move |c| {
            let r = c.rank() as f32;
            let t =
                Tensor::from_vec((0..7).map(|i| i as f32 + 10.0 * r).collect::<Vec<_>>(), (7,), &Device::Cpu).unwrap();
            let sum = vals(&c.all_reduce_sum(&t).unwrap());
            let mine = Tensor::from_vec(vec![r; c.rank() + 1], (c.rank() + 1,), &Device::Cpu).unwrap();
            let gathered = vals(&c.all_gather(&mine, 0).unwrap());
            let rs = vals(&c.reduce_scatter_sum(&t, 0).unwrap());
            (sum, gathered, rs)
        });
        let total_r: f32 = (0..world).map(|r| r as f32).sum();
        let want: Vec<f32> = (0..7).map(|i| world as f32 * i as f32 + 10.0 * total_r).collect();
        let gathered: Vec<f32> = (0..world).flat_map(|r| vec![r as f32; r + 1]).collect();
        for (r, (sum, g, rs)) in out.iter().enumerate() {
            assert_eq!(sum, &want, "{name} world {world} rank {r}");
            assert_eq!(g, &gathered);
            let (a, b) = part(7, world, r);
            assert_eq!(rs, &want[a..b].to_vec());
        }
    }
}

#[test]
fn broadcast_send_recv_and_all_to_all() {
    for (name, make) in BACKENDS {
        broadcast_send_recv_and_all_to_all_on(name, make);
    }
}

fn broadcast_send_recv_and_all_to_all_on(name: &str, make: Make) {
    let out = on_ranks(make, 3, |c| {
        let b = c.broadcast_bytes(if c.rank() == 1 { b"plan" } else { b"" }, 1).unwrap();
        let next = (c.rank() + 1) % 3;
        let prev = (c.rank() + 2) % 3;
        let t = Tensor::from_vec(vec![c.rank() as u32; 2], (2,), &Device::Cpu).unwrap();
        c.send(next, &t).unwrap();
        let got = c.recv(prev).unwrap().to_vec1::<u32>().unwrap();
        let parts: Vec<Tensor> =
            (0..3).map(|j| Tensor::new(&[(10 * c.rank() + j) as f32], &Device::Cpu).unwrap()).collect();
        let a2a: Vec<f32> = c.all_to_all(parts).unwrap().iter().map(|t| vals(t)[0]).collect();
        (b, got, a2a)
    });
    for (r, (b, got, a2a)) in out.into_iter().enumerate() {
        assert_eq!(b, b"plan", "{name}");
        assert_eq!(got, vec![((r + 2) % 3) as u32; 2]);
        assert_eq!(a2a, (0..3).map(|j| (10 * j + r) as f32).collect::<Vec<_>>());
    }
}

#[test]
fn large_messages_do_not_deadlock() {
    // 4 MB per rank, written by both sides at once.
    for (name, make) in BACKENDS {
        let out = on_ranks(make, 2, |c| {
            let t = Tensor::ones((1 << 20,), candle_core::DType::F32, &Device::Cpu).unwrap();
            vals(&c.all_reduce_sum(&t).unwrap()).iter().all(|&x| x == 2.0)
        });
        assert!(out.iter().all(|&ok| ok), "{name}");
    }
}

#[test]
fn a_missing_rank_fails_the_rendezvous_naming_it() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let leader = format!("127.0.0.1:{port}");
    let l2 = leader.clone();
    let joiner = std::thread::spawn(move || TcpComm::join(1, 3, &l2, Duration::from_secs(2), Device::Cpu));
    let t = Instant::now();
    let e = TcpComm::join(0, 3, &leader, Duration::from_secs(2), Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("[2]") && e.contains("never joined"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(joiner.join().unwrap().is_err(), "rank 1 fails too");
}

#[test]
fn a_dead_peer_is_reported_not_waited_for() {
    for (name, make) in BACKENDS {
        let mut group = make(2);
        let survivor = group.remove(0);
        drop(group); // rank 1 goes away
        let t = Tensor::ones((4,), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = survivor.all_reduce_sum(&t).unwrap_err().to_string();
        assert!(e.contains("rank 1 disconnected"), "{name}: {e}");
        let e = survivor.recv_bytes(1).unwrap_err().to_string();
        assert!(e.contains("rank 1 disconnected"), "{name}: {e}");
    }
}

#[test]
fn a_rank_leaving_mid_collective_wakes_the_waiting_ones() {
    for (name, make) in BACKENDS {
        let mut group = make(3);
        let leaver = group.pop().unwrap();
        let waiting: Vec<_> = group
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let t = Tensor::ones((4,), candle_core::DType::F32, &Device::Cpu).unwrap();
                    c.all_reduce_sum(&t).map(|_| ()).map_err(|e| e.to_string())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        leaver.shutdown();
        drop(leaver);
        for h in waiting {
            let e = h.join().unwrap().unwrap_err();
            assert!(e.contains("rank 2 disconnected"), "{name}: {e}");
        }
    }
}
