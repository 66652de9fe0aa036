use super::*;

/// Run `f` on every rank of a loopback group of `world`, one thread per rank.
fn on_ranks<T: Send + 'static>(world: usize, f: impl Fn(&TcpComm) -> T + Send + Sync + 'static) -> Vec<T> {
    let group = TcpComm::local_group(world, Device::Cpu).expect("group");
    let f = std::sync::Arc::new(f);
    let hs: Vec<_> = group
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(&c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn all_reduce_gather_scatter_on_2_3_and_4_ranks() {
    for world in [2, 3, 4] {
        // 7 elements: parts are uneven for 2, 3 and 4 ranks.
        let out = on_ranks(world, move |c| {
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
            assert_eq!(sum, &want, "world {world} rank {r}");
            assert_eq!(g, &gathered);
            let (a, b) = part(7, world, r);
            assert_eq!(rs, &want[a..b].to_vec());
        }
    }
}

#[test]
fn broadcast_send_recv_and_all_to_all() {
    let out = on_ranks(3, |c| {
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
        assert_eq!(b, b"plan");
        assert_eq!(got, vec![((r + 2) % 3) as u32; 2]);
        assert_eq!(a2a, (0..3).map(|j| (10 * j + r) as f32).collect::<Vec<_>>());
    }
}

#[test]
fn large_messages_do_not_deadlock() {
    // 4 MB per rank, written by both sides at once.
    let out = on_ranks(2, |c| {
        let t = Tensor::ones((1 << 20,), candle_core::DType::F32, &Device::Cpu).unwrap();
        vals(&c.all_reduce_sum(&t).unwrap()).iter().all(|&x| x == 2.0)
    });
    assert!(out.iter().all(|&ok| ok));
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
    let mut group = TcpComm::local_group(2, Device::Cpu).unwrap();
    let survivor = group.remove(0);
    drop(group); // rank 1 goes away
    let t = Tensor::ones((4,), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = survivor.all_reduce_sum(&t).unwrap_err().to_string();
    assert!(e.contains("rank 1 disconnected"), "{e}");
}
