//! The transfer service and the pull over loopback, on an in-memory block store.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_runner::{KvBlockStore, Result};

use super::*;
use crate::stats::EngineStats;

/// `layers` layers of `blocks` blocks of `bb` bytes (keys), and as many for values.
pub(crate) struct MemStore {
    pub bb: usize,
    pub data: Vec<Mutex<(Vec<u8>, Vec<u8>)>>,
}

impl MemStore {
    pub fn new(layers: usize, blocks: usize, bb: usize, seed: u8) -> Self {
        let fill =
            |l: usize, kv: u8| (0..blocks * bb).map(|i| (i as u8).wrapping_mul(31) ^ seed ^ kv ^ l as u8).collect();
        Self { bb, data: (0..layers).map(|l| Mutex::new((fill(l, 0), fill(l, 0x55)))).collect() }
    }

    fn block(&self, layer: usize, b: u32) -> (Vec<u8>, Vec<u8>) {
        let d = self.data[layer].lock().unwrap();
        let r = b as usize * self.bb..(b as usize + 1) * self.bb;
        (d.0[r.clone()].to_vec(), d.1[r].to_vec())
    }
}

impl KvBlockStore for MemStore {
    fn num_layers(&self) -> usize {
        self.data.len()
    }
    fn block_bytes(&self) -> usize {
        self.bb
    }
    fn read_all(&self, blocks: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for layer in &self.data {
            let d = layer.lock().unwrap();
            for half in [&d.0, &d.1] {
                for &b in blocks {
                    out.extend_from_slice(&half[b as usize * self.bb..(b as usize + 1) * self.bb]);
                }
            }
        }
        Ok(out)
    }
    fn write_all(&self, blocks: &[u32], data: &[u8]) -> Result<()> {
        let n = blocks.len() * self.bb;
        for (layer, chunk) in self.data.iter().zip(data.chunks_exact(2 * n)) {
            let mut guard = layer.lock().unwrap();
            let d = &mut *guard;
            for (half, src) in [&mut d.0, &mut d.1].into_iter().zip([&chunk[..n], &chunk[n..]]) {
                for (&b, bytes) in blocks.iter().zip(src.chunks_exact(self.bb)) {
                    half[b as usize * self.bb..(b as usize + 1) * self.bb].copy_from_slice(bytes);
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn layout(block_size: usize) -> KvLayout {
    KvLayout {
        model: "llama hidden 64".into(),
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 8,
        dtype: "f16".into(),
        block_size,
        tp_size: 1,
        pp_size: 1,
        rope_interleaved: false,
    }
}

/// A running service on an ephemeral port: its port, pins, stats and unpinned sequences.
fn serve(store: Arc<MemStore>) -> (u16, Arc<Pins>, Arc<EngineStats>, mpsc::Receiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (pins, stats) = (Arc::new(Pins::default()), Arc::new(EngineStats::new(8, 16)));
    let (tx, rx) = mpsc::channel();
    let svc = server::Service {
        engine_id: "prefill-a".into(),
        layout: layout(16),
        store,
        pins: pins.clone(),
        stats: stats.clone(),
        unpin: Box::new(move |seq| {
            let _ = tx.send(seq);
        }),
    };
    server::start(listener, svc);
    (port, pins, stats, rx)
}

fn source(port: u16, token: &str, blocks: Vec<u32>) -> RemoteSource {
    RemoteSource {
        host: "127.0.0.1".into(),
        port,
        engine_id: Some("prefill-a".into()),
        block_ids: blocks,
        token: token.into(),
        num_tokens: 40,
    }
}

fn pin(pins: &Pins, token: &str, seq: u64, blocks: Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    pins.insert(token.into(), Pin { seq, blocks, num_tokens: 40, deadline });
}

const T: Duration = Duration::from_secs(5);

#[test]
fn a_pull_copies_the_pinned_blocks_once_and_frees_them() {
    let remote = Arc::new(MemStore::new(2, 8, 64, 1));
    let (port, pins, stats, unpinned) = serve(remote.clone());
    pin(&pins, "tok", 7, vec![5, 2, 6]);
    let local = MemStore::new(2, 8, 64, 2);
    let src = source(port, "tok", vec![5, 2, 6]);
    let got = client::pull(&src, &[5, 2], &[0, 3], &layout(16), &local, T).expect("pull");
    assert_eq!((got.blocks, got.bytes), (2, 2 * 2 * 2 * 64));
    for layer in 0..2 {
        assert_eq!(local.block(layer, 0), remote.block(layer, 5));
        assert_eq!(local.block(layer, 3), remote.block(layer, 2));
        assert_ne!(local.block(layer, 1), remote.block(layer, 6), "blocks not asked for are not written");
    }
    assert_eq!(unpinned.recv_timeout(T), Ok(7));
    assert_eq!(stats.kv.bytes_sent.load(std::sync::atomic::Ordering::Relaxed), got.bytes as u64);
    // The token is spent.
    let again = client::pull(&src, &[5], &[1], &layout(16), &local, T).unwrap_err();
    assert!(again.contains("unknown, used or expired"), "{again}");
}

#[test]
fn refusals_name_what_differs() {
    let (port, pins, _, unpinned) = serve(Arc::new(MemStore::new(2, 8, 64, 1)));
    let local = MemStore::new(2, 8, 64, 2);
    pin(&pins, "tok", 1, vec![1, 2]);
    let src = source(port, "tok", vec![1, 2]);
    for (change, needle) in [
        (&mut |l: &mut KvLayout| l.block_size = 32, "block size differs: prefill 16, decode 32"),
        (&mut |l: &mut KvLayout| l.dtype = "bf16".into(), "KV cache dtype differs: prefill f16, decode bf16"),
        (&mut |l: &mut KvLayout| l.model = "qwen2".into(), "model differs"),
        (&mut |l: &mut KvLayout| l.rope_interleaved = true, "rotary key layout differs"),
        (&mut |l: &mut KvLayout| l.tp_size = 2, "tp 1 pp 1, decode tp 2 pp 1"),
    ] as [(&mut dyn FnMut(&mut KvLayout), &str); 5]
    {
        let mut other = layout(16);
        change(&mut other);
        let e = client::pull(&src, &[1], &[1], &other, &local, T).unwrap_err();
        assert!(e.contains(needle), "{e}");
    }
    let mut wrong_engine = src.clone();
    wrong_engine.engine_id = Some("prefill-b".into());
    let e = client::pull(&wrong_engine, &[1], &[1], &layout(16), &local, T).unwrap_err();
    assert!(e.contains("engine id differs"), "{e}");
    // None of that spent the token; asking for a block outside the pin does (and frees it).
    assert!(unpinned.try_recv().is_err());
    let e = client::pull(&src, &[3], &[1], &layout(16), &local, T).unwrap_err();
    assert!(e.contains("block 3 is not part"), "{e}");
    assert_eq!(unpinned.recv_timeout(T), Ok(1));
    let e = client::pull(&source(1, "tok", vec![1]), &[1], &[1], &layout(16), &local, T).unwrap_err();
    assert!(e.contains("cannot reach"), "{e}");
}

#[test]
fn a_corrupt_or_short_frame_is_detected() {
    for corrupt in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let _: wire::Hello = wire::read_line(&mut r).unwrap();
            let mut w = conn;
            wire::write_line(&mut w, &wire::Reply { error: None, layers: 2, block_bytes: 64 }).unwrap();
            let data = vec![9u8; 2 * 64];
            let mut head = [0u8; 12];
            head[..8].copy_from_slice(&(data.len() as u64).to_le_bytes());
            let crc = crc32fast::hash(&data) ^ u32::from(corrupt);
            head[8..].copy_from_slice(&crc.to_le_bytes());
            w.write_all(&head).unwrap();
            // Short: half the payload, then the connection closes.
            w.write_all(if corrupt { &data } else { &data[..64] }).unwrap();
        });
        let local = MemStore::new(2, 8, 64, 2);
        let e = client::pull(&source(port, "t", vec![1]), &[1], &[0], &layout(16), &local, T).unwrap_err();
        assert!(e.contains(if corrupt { "checksum" } else { "reading a KV frame" }), "{e}");
        assert_ne!(local.block(0, 0).0, vec![9u8; 64], "nothing from a bad frame is written");
        fake.join().unwrap();
    }
}

#[test]
fn a_flood_of_connections_is_capped() {
    let (port, pins, _, _) = serve(Arc::new(MemStore::new(2, 8, 64, 1)));
    pin(&pins, "tok", 1, vec![1]);
    // Connections that never say hello hold every slot (until their hello timeout).
    let idle: Vec<_> =
        (0..server::MAX_CONNECTIONS).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let local = MemStore::new(2, 8, 64, 2);
    let e = client::pull(&source(port, "tok", vec![1]), &[1], &[0], &layout(16), &local, T).unwrap_err();
    assert!(e.contains("retry later"), "{e}");
    drop(idle);
    // Slots come back as the idle connections end; the token was never spent.
    let start = Instant::now();
    loop {
        match client::pull(&source(port, "tok", vec![1]), &[1], &[0], &layout(16), &local, T) {
            Ok(_) => break,
            Err(e) if e.contains("retry later") && start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("{e}"),
        }
    }
}
