//! The prefill side's transfer service: one thread per connection; a pull that presents a
//! live token and a matching layout gets that request's blocks, which are unpinned after.

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_runner::KvBlockStore;

use super::wire::{self, Hello, Reply};
use super::{KvLayout, Pins};
use crate::stats::EngineStats;

/// How long a connection may take to say what it wants.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a send may stall on a puller that stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the service needs: its engine's identity, blocks and pins.
pub struct Service {
    pub engine_id: String,
    pub layout: KvLayout,
    pub store: Arc<dyn KvBlockStore>,
    pub pins: Arc<Pins>,
    pub stats: Arc<EngineStats>,
    /// Called with a claimed pin's sequence once its blocks are sent (or refused): the engine
    /// frees them.
    pub unpin: Box<dyn Fn(u64) + Send + Sync>,
}

/// Connections served at once; more are closed at once (their pullers recompute), so a flood
/// of connections cannot exhaust threads or memory.
pub const MAX_CONNECTIONS: usize = 64;

/// Serve pulls on `listener` (for the life of the process).
pub fn start(listener: TcpListener, svc: Service) {
    let svc = Arc::new(svc);
    let live = Arc::new(AtomicUsize::new(0));
    let spawned = std::thread::Builder::new().name("tessera-kv-serve".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let taken =
                live.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_CONNECTIONS).then_some(n + 1));
            if taken.is_err() {
                let mut w = BufWriter::new(conn);
                let _ =
                    refuse(&mut w, format!("the KV transfer service is serving {MAX_CONNECTIONS} pulls; retry later"));
                continue;
            }
            let (svc, slot) = (svc.clone(), live.clone());
            let spawned = std::thread::Builder::new().name("tessera-kv-send".into()).spawn(move || {
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Err(e) = serve(&svc, conn) {
                    tracing::warn!("KV transfer to {peer}: {e}");
                }
                slot.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                live.fetch_sub(1, Ordering::SeqCst);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the KV transfer service: {e}");
    }
}

fn refuse(w: &mut impl std::io::Write, why: String) -> Result<(), String> {
    let _ = wire::write_line(w, &Reply { error: Some(why.clone()), layers: 0, block_bytes: 0 });
    Err(why)
}

fn serve(svc: &Service, conn: TcpStream) -> Result<(), String> {
    let _ = conn.set_read_timeout(Some(HELLO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(SEND_TIMEOUT));
    let _ = conn.set_nodelay(true);
    let mut r = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut w = BufWriter::with_capacity(1 << 20, conn);
    let hello: Hello = wire::read_line(&mut r).map_err(|e| format!("bad hello: {e}"))?;
    if hello.version != wire::VERSION {
        return refuse(&mut w, format!("KV transfer version {} is not {}", hello.version, wire::VERSION));
    }
    if let Some(why) = svc.layout.mismatch(&hello.layout) {
        return refuse(&mut w, why);
    }
    if let Some(id) = hello.engine_id.as_deref().filter(|id| *id != svc.engine_id) {
        return refuse(&mut w, format!("engine id differs: this is {}, the pull asked for {id}", svc.engine_id));
    }
    let Some(pin) = svc.pins.claim(&hello.token, Instant::now()) else {
        return refuse(&mut w, "unknown, used or expired transfer token".into());
    };
    // The pin is ours now: whatever happens next, its blocks are freed after.
    let result = send(svc, &mut w, &hello, &pin.blocks, pin.num_tokens);
    (svc.unpin)(pin.seq);
    result
}

fn send(
    svc: &Service,
    w: &mut BufWriter<TcpStream>,
    hello: &Hello,
    pinned: &[u32],
    num_tokens: usize,
) -> Result<(), String> {
    if hello.blocks.is_empty() {
        return refuse(w, "a pull must name at least one block".into());
    }
    if hello.num_tokens != num_tokens {
        return refuse(w, format!("prompt length differs: prefill {num_tokens}, decode {}", hello.num_tokens));
    }
    if let Some(b) = hello.blocks.iter().find(|b| !pinned.contains(b)) {
        return refuse(w, format!("block {b} is not part of this request's prefill"));
    }
    let (layers, block_bytes) = (svc.store.num_layers(), svc.store.block_bytes());
    wire::write_line(w, &Reply { error: None, layers, block_bytes }).map_err(|e| e.to_string())?;
    let all = svc.store.read_all(&hello.blocks).map_err(|e| e.to_string())?;
    for frame in all.chunks(2 * block_bytes * hello.blocks.len()).take(layers) {
        wire::write_frame(w, frame).map_err(|e| e.to_string())?;
    }
    std::io::Write::flush(w).map_err(|e| e.to_string())?;
    svc.stats.kv.blocks_sent.fetch_add(hello.blocks.len() as u64, Ordering::Relaxed);
    svc.stats.kv.bytes_sent.fetch_add((2 * layers * block_bytes * hello.blocks.len()) as u64, Ordering::Relaxed);
    Ok(())
}
