//! The decode side's pull: fetch a prefilled request's blocks into local blocks.

use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tessera_runner::KvBlockStore;

use super::wire::{self, Hello, Reply};
use super::{KvLayout, RemoteSource};

/// What a successful pull moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PullStats {
    pub blocks: usize,
    pub bytes: usize,
    pub seconds: f64,
}

/// Pull `remote` blocks of `src` into `local` blocks of `store`, within `timeout` per I/O.
/// An error says why (the decode side then computes the prompt itself).
pub fn pull(
    src: &RemoteSource,
    remote: &[u32],
    local: &[u32],
    layout: &KvLayout,
    store: &dyn KvBlockStore,
    timeout: Duration,
) -> Result<PullStats, String> {
    let t0 = Instant::now();
    let at = format!("{}:{}", src.host.trim_start_matches('[').trim_end_matches(']'), src.port);
    let addr = (src.host.as_str(), src.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {at}: {e}"))?
        .next()
        .ok_or_else(|| format!("{at} resolves to no address"))?;
    let conn = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot reach {at}: {e}"))?;
    let _ = conn.set_read_timeout(Some(timeout));
    let _ = conn.set_write_timeout(Some(timeout));
    let _ = conn.set_nodelay(true);
    let mut r = BufReader::with_capacity(1 << 20, conn.try_clone().map_err(|e| e.to_string())?);
    let mut w = BufWriter::new(conn);
    let hello = Hello {
        version: wire::VERSION,
        layout: layout.clone(),
        engine_id: src.engine_id.clone(),
        token: src.token.clone(),
        blocks: remote.to_vec(),
        num_tokens: src.num_tokens,
    };
    wire::write_line(&mut w, &hello).map_err(|e| format!("{at}: {e}"))?;
    let reply: Reply = wire::read_line(&mut r).map_err(|e| format!("{at}: {e}"))?;
    if let Some(why) = reply.error {
        return Err(format!("{at} refused the pull: {why}"));
    }
    if (reply.layers, reply.block_bytes) != (store.num_layers(), store.block_bytes()) {
        return Err(format!(
            "{at} sends {} layers of {}-byte blocks, this cache has {} of {}",
            reply.layers,
            reply.block_bytes,
            store.num_layers(),
            store.block_bytes()
        ));
    }
    let len = 2 * reply.block_bytes * remote.len();
    let (mut all, mut buf) = (Vec::with_capacity(len * reply.layers), Vec::with_capacity(len));
    for _ in 0..reply.layers {
        wire::read_frame(&mut r, len, &mut buf).map_err(|e| format!("{at}: {e}"))?;
        all.extend_from_slice(&buf);
    }
    // Only whole, checked data is written.
    store.write_all(local, &all).map_err(|e| e.to_string())?;
    Ok(PullStats { blocks: remote.len(), bytes: all.len(), seconds: t0.elapsed().as_secs_f64() })
}
