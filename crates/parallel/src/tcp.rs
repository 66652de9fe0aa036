//! The CPU back-end: a full mesh of TCP connections between the ranks.
//!
//! Rendezvous: rank 0 listens on the leader address; every other rank connects (retrying
//! until the timeout) and says who it is and where its own mesh listener is; rank 0 answers
//! with the table, then every rank connects to the lower ranks and accepts the higher ones.
//! A rank that never arrives fails the rendezvous with a message naming it; a rank that dies
//! later shows up as [`CommError::PeerGone`] on the next operation that touches it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::wire::{bytes_f32, decode_tensor, encode_tensor, f32_bytes, f32s, gone_or_io, read_frame, write_frame};
use crate::{part, CommError, Communicator, Result};

/// How long ranks wait for each other at start-up unless told otherwise.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages up to this size are written inline; larger ones from a helper thread so that two
/// ranks writing to each other at once cannot both block on full socket buffers.
const INLINE_BYTES: usize = 64 * 1024;
const MAGIC: &[u8; 4] = b"TSRA";

struct Peer {
    reader: Mutex<BufReader<TcpStream>>,
    writer: Mutex<BufWriter<TcpStream>>,
}

/// One rank of a TCP group.
pub struct TcpComm {
    rank: usize,
    world: usize,
    peers: Vec<Option<Peer>>,
    device: Device,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpComm(rank {} of {})", self.rank, self.world)
    }
}

fn io(rank: usize, what: &str) -> impl FnOnce(std::io::Error) -> CommError + '_ {
    move |source| CommError::Io { rank, what: what.to_string(), source }
}

fn accept_until(l: &TcpListener, deadline: Instant) -> std::io::Result<Option<TcpStream>> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> Option<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl TcpComm {
    /// Join the group of `world` ranks whose rank 0 listens at `leader` (`host:port`).
    pub fn join(rank: usize, world: usize, leader: &str, timeout: Duration, device: Device) -> Result<Self> {
        if rank >= world {
            return Err(CommError::Usage(format!("rank {rank} is not below the world size {world}")));
        }
        let leader_addr = leader
            .to_socket_addrs()
            .map_err(|e| CommError::Rendezvous(format!("leader address `{leader}`: {e}")))?
            .next()
            .ok_or_else(|| CommError::Rendezvous(format!("leader address `{leader}` resolves to nothing")))?;
        let deadline = Instant::now() + timeout;
        if world == 1 {
            return Ok(Self { rank, world, peers: vec![None], device });
        }
        // Followers listen on every address of the leader's family (the leader records the
        // address it sees them connect from).
        let any: IpAddr =
            if leader_addr.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let mesh = TcpListener::bind((if rank == 0 { leader_addr.ip() } else { any }, 0))
            .map_err(io(rank, "bind the mesh listener"))?;
        let mesh_port = mesh.local_addr().map_err(io(rank, "mesh listener"))?.port();
        let table = if rank == 0 {
            Self::lead(world, leader_addr, mesh_port, deadline, timeout)?
        } else {
            Self::follow(rank, world, leader_addr, mesh_port, deadline, timeout)?
        };
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (j, addr) in table.iter().enumerate().take(rank) {
            let mut s = connect_until(*addr, deadline)
                .ok_or_else(|| CommError::Rendezvous(format!("rank {rank} cannot reach rank {j} at {addr}")))?;
            s.write_all(&(rank as u32).to_le_bytes()).map_err(io(j, "mesh hello"))?;
            streams[j] = Some(s);
        }
        for _ in rank + 1..world {
            let missing = |streams: &[Option<TcpStream>]| -> Vec<usize> {
                (rank + 1..world).filter(|&j| streams[j].is_none()).collect()
            };
            let Some(mut s) = accept_until(&mesh, deadline).map_err(io(rank, "mesh accept"))? else {
                return Err(CommError::Rendezvous(format!(
                    "ranks {:?} never connected to rank {rank} within {timeout:?}",
                    missing(&streams)
                )));
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io(rank, "timeout"))?;
            let j = read_u32(&mut s).map_err(io(rank, "mesh hello"))? as usize;
            s.set_read_timeout(None).map_err(io(rank, "timeout"))?;
            if j <= rank || j >= world || streams[j].is_some() {
                return Err(CommError::Rendezvous(format!("rank {rank} got an unexpected mesh hello from rank {j}")));
            }
            streams[j] = Some(s);
        }
        let mut peers = Vec::with_capacity(world);
        for (j, s) in streams.into_iter().enumerate() {
            peers.push(match s {
                None => None,
                Some(s) => {
                    s.set_nodelay(true).map_err(io(j, "nodelay"))?;
                    let r = s.try_clone().map_err(io(j, "clone the stream"))?;
                    Some(Peer { reader: Mutex::new(BufReader::new(r)), writer: Mutex::new(BufWriter::new(s)) })
                }
            });
        }
        tracing::debug!("rank {rank} of {world} joined the group at {leader}");
        Ok(Self { rank, world, peers, device })
    }

    /// Rank 0: collect every rank's hello, answer with the address table.
    fn lead(
        world: usize,
        leader: SocketAddr,
        mesh_port: u16,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>> {
        let l = TcpListener::bind(leader)
            .map_err(|e| CommError::Rendezvous(format!("rank 0 cannot listen on {leader}: {e}")))?;
        let mut table: Vec<Option<SocketAddr>> = vec![None; world];
        table[0] = Some(SocketAddr::new(leader.ip(), mesh_port));
        let mut conns = Vec::new();
        while table.iter().any(Option::is_none) {
            let Some(mut s) = accept_until(&l, deadline).map_err(io(0, "accept"))? else {
                let missing: Vec<usize> = (0..world).filter(|&j| table[j].is_none()).collect();
                return Err(CommError::Rendezvous(format!(
                    "ranks {missing:?} of {world} never joined the leader at {leader} within {timeout:?}"
                )));
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io(0, "timeout"))?;
            let mut hello = [0u8; 16];
            if let Err(e) = s.read_exact(&mut hello) {
                // A probe or an abandoned attempt: the real rank retries.
                tracing::debug!("rendezvous: ignoring a connection without a hello: {e}");
                continue;
            }
            let field = |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]) as usize;
            let (r, w, port) = (field(4), field(8), field(12) as u16);
            if &hello[..4] != MAGIC || w != world || r == 0 || r >= world || table[r].is_some() {
                tracing::warn!(
                    "rendezvous: ignoring a hello from rank {r} of world {w} (expected a new rank in 1..{world} of world {world})"
                );
                continue;
            }
            let ip = s.peer_addr().map_err(io(r, "peer address"))?.ip();
            table[r] = Some(SocketAddr::new(ip, port));
            conns.push(s);
        }
        let table: Vec<SocketAddr> = table.into_iter().flatten().collect();
        let text: Vec<String> = table.iter().map(|a| a.to_string()).collect();
        let msg = text.join(",");
        for mut s in conns {
            write_frame(&mut s, msg.as_bytes()).map_err(io(0, "send the table"))?;
        }
        Ok(table)
    }

    /// Other ranks: say hello to rank 0, read the table.
    fn follow(
        rank: usize,
        world: usize,
        leader: SocketAddr,
        mesh_port: u16,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>> {
        let mut s = connect_until(leader, deadline).ok_or_else(|| {
            CommError::Rendezvous(format!("rank {rank} could not reach the leader at {leader} within {timeout:?}"))
        })?;
        let mut hello = MAGIC.to_vec();
        for v in [rank as u32, world as u32, mesh_port as u32] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        s.write_all(&hello).map_err(io(0, "hello"))?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).map_err(io(0, "timeout"))?;
        let msg = read_frame(&mut s, 0).map_err(|e| {
            CommError::Rendezvous(format!(
                "rank {rank}: the leader did not send the rank table within {timeout:?} ({e})"
            ))
        })?;
        let text = String::from_utf8(msg).map_err(|_| CommError::Protocol { rank: 0, what: "table".into() })?;
        let mut table = Vec::with_capacity(world);
        for (j, a) in text.split(',').enumerate() {
            let mut a: SocketAddr =
                a.parse().map_err(|_| CommError::Protocol { rank: 0, what: format!("table entry `{a}`") })?;
            if j == 0 || a.ip().is_unspecified() {
                // Reach rank 0 (or a wildcard-bound rank) the way we reached the leader.
                let ip: IpAddr = if j == 0 { leader.ip() } else { a.ip() };
                a.set_ip(ip);
            }
            table.push(a);
        }
        if table.len() != world {
            return Err(CommError::Protocol {
                rank: 0,
                what: format!("table of {} ranks for world {world}", table.len()),
            });
        }
        Ok(table)
    }

    /// A whole group of `world` ranks on loopback, for tests and single-host serving: one
    /// [`TcpComm`] per rank (hand each to its own thread).
    pub fn local_group(world: usize, device: Device) -> Result<Vec<TcpComm>> {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(io(0, "pick a port"))?.port();
        let leader = format!("127.0.0.1:{port}");
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (leader, device) = (leader.clone(), device.clone());
                std::thread::spawn(move || TcpComm::join(r, world, &leader, Duration::from_secs(30), device))
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| CommError::Usage("a rank thread panicked".into()))?).collect()
    }

    fn peer(&self, j: usize) -> Result<&Peer> {
        self.peers
            .get(j)
            .and_then(Option::as_ref)
            .ok_or_else(|| CommError::Usage(format!("rank {} has no peer {j} (world {})", self.rank, self.world)))
    }

    /// Send `msgs[j]` to every other rank `j` and receive one frame from each; returns frames by rank.
    fn exchange(&self, msgs: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        let others: Vec<usize> = (0..self.world).filter(|&j| j != self.rank).collect();
        let big = others.iter().any(|&j| msgs[j].len() > INLINE_BYTES);
        let mut got: Vec<Vec<u8>> = vec![Vec::new(); self.world];
        std::thread::scope(|sc| -> Result<()> {
            let mut senders = Vec::new();
            for &j in &others {
                if big {
                    senders.push(sc.spawn(move || self.send_bytes(j, &msgs[j])));
                } else {
                    self.send_bytes(j, &msgs[j])?;
                }
            }
            for &j in &others {
                got[j] = self.recv_bytes(j)?;
            }
            for s in senders {
                s.join().map_err(|_| CommError::Usage("a sender thread panicked".into()))??;
            }
            Ok(())
        })?;
        Ok(got)
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let mut v = f32s(t)?;
        let n = v.len();
        // Reduce-scatter: rank j sums part j; then all-gather the summed parts.
        let msgs: Vec<Vec<u8>> = (0..self.world)
            .map(|j| {
                let (a, b) = part(n, self.world, j);
                f32_bytes(&v[a..b])
            })
            .collect();
        let got = self.exchange(&msgs)?;
        let (a, b) = part(n, self.world, self.rank);
        for (j, bytes) in got.iter().enumerate() {
            if j == self.rank {
                continue;
            }
            let theirs = bytes_f32(bytes, j)?;
            if theirs.len() != b - a {
                return Err(CommError::Protocol { rank: j, what: "all-reduce part of the wrong size".into() });
            }
            for (x, y) in v[a..b].iter_mut().zip(theirs) {
                *x += y;
            }
        }
        let mine = f32_bytes(&v[a..b]);
        let msgs: Vec<Vec<u8>> = (0..self.world).map(|_| mine.clone()).collect();
        let got = self.exchange(&msgs)?;
        for (j, bytes) in got.iter().enumerate() {
            if j == self.rank {
                continue;
            }
            let (a, b) = part(n, self.world, j);
            let theirs = bytes_f32(bytes, j)?;
            if theirs.len() != b - a {
                return Err(CommError::Protocol { rank: j, what: "all-reduce part of the wrong size".into() });
            }
            v[a..b].copy_from_slice(&theirs);
        }
        Ok(Tensor::from_vec(v, t.shape(), &self.device)?.to_dtype(t.dtype())?)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let mine = encode_tensor(t)?;
        let msgs: Vec<Vec<u8>> = (0..self.world).map(|_| mine.clone()).collect();
        let got = self.exchange(&msgs)?;
        let mut parts = Vec::with_capacity(self.world);
        for (j, bytes) in got.iter().enumerate() {
            parts.push(if j == self.rank { t.clone() } else { decode_tensor(bytes, &self.device, j)? });
        }
        Ok(Tensor::cat(&parts, dim)?)
    }

    fn reduce_scatter_sum(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let sum = self.all_reduce_sum(t)?;
        let (a, b) = part(t.dim(dim)?, self.world, self.rank);
        Ok(sum.narrow(dim, a, b - a)?)
    }

    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        if self.rank == root {
            for j in (0..self.world).filter(|&j| j != root) {
                self.send_bytes(j, data)?;
            }
            Ok(data.to_vec())
        } else {
            self.recv_bytes(root)
        }
    }

    fn send_bytes(&self, to: usize, data: &[u8]) -> Result<()> {
        let p = self.peer(to)?;
        let mut w = p.writer.lock().map_err(|_| CommError::Usage("a writer lock is poisoned".into()))?;
        write_frame(&mut *w, data).map_err(|e| gone_or_io(to, "send", e))
    }

    fn recv_bytes(&self, from: usize) -> Result<Vec<u8>> {
        let p = self.peer(from)?;
        let mut r = p.reader.lock().map_err(|_| CommError::Usage("a reader lock is poisoned".into()))?;
        read_frame(&mut *r, from)
    }

    fn send(&self, to: usize, t: &Tensor) -> Result<()> {
        self.send_bytes(to, &encode_tensor(t)?)
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        decode_tensor(&self.recv_bytes(from)?, &self.device, from)
    }

    fn shutdown(&self) {
        for p in self.peers.iter().flatten() {
            if let Ok(w) = p.writer.lock() {
                let _ = w.get_ref().shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if parts.len() != self.world {
            return Err(CommError::Usage(format!("all_to_all needs {} parts, got {}", self.world, parts.len())));
        }
        let msgs: Vec<Vec<u8>> = parts.iter().map(encode_tensor).collect::<Result<_>>()?;
        let got = self.exchange(&msgs)?;
        let mut out = Vec::with_capacity(self.world);
        for (j, bytes) in got.iter().enumerate() {
            out.push(if j == self.rank { parts[j].clone() } else { decode_tensor(bytes, &self.device, j)? });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
