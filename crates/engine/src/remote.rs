//! Data-parallel replicas on other pods (KServe's data-parallel LeaderWorkerSet: the leader
//! pod serves HTTP, each worker pod runs `--data-parallel-size-local` whole engines).
//!
//! On the leader every remote replica is an ordinary [`EngineHandle`] ([`accept_replicas`]):
//! admission, the waiting-queue bound and shedding run there as for a local engine, and a
//! forwarding thread carries the handle's commands over one TCP connection. The worker pod
//! joins before it loads ([`join_leader`], so the leader can name ranks that never come) and
//! then serves one local engine per connection ([`Joined::serve`]): it submits what arrives,
//! streams every output back tagged with the leader's choice id, and sends its figures
//! ([`EngineStats`]) every [`STATS_INTERVAL`], which doubles as a heartbeat. Frames are JSON
//! lines. A connection that breaks or goes silent for [`HEARTBEAT_TIMEOUT`] fails that
//! replica: its requests end with an error naming the rank and `/health` turns 503.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::core::{Command, EngineHandle, EngineRequest, OutputTx, RequestOutput, Shared};
use crate::stats::{EngineStats, StatsWire};
use crate::{EngineConfig, EngineError};

/// How often a remote replica reports its figures.
pub const STATS_INTERVAL: Duration = Duration::from_millis(100);
/// A remote replica silent for this long counts as lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Worker pod → leader, first line of a connection (sent before the pod loads its model).
#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    dp_rank: usize,
}

/// Worker pod → leader, second line: the replica is loaded and has these limits.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ready {
    cfg: EngineConfig,
}

/// Leader → worker pod, the reply to [`Hello`] (when refused) or to [`Ready`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Welcome {
    refused: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
enum ToEngine {
    Add { first_id: u64, req: Box<EngineRequest> },
    Abort { id: u64 },
    AbortAll { err: EngineError },
    RetireLora { id: u32 },
}

#[derive(serde::Serialize, serde::Deserialize)]
enum FromEngine {
    Output { id: u64, item: Result<RequestOutput, EngineError> },
    Stats(StatsWire),
}

fn line<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain data types cannot fail; an empty line is skipped by the reader.
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b
}

fn rpc(e: impl std::fmt::Display) -> EngineError {
    EngineError::Rpc(e.to_string())
}

/// Choices in flight on one remote replica, as seen by the leader.
#[derive(Default)]
struct Pending {
    /// choice id → (its stream, the id of its request's first choice)
    txs: HashMap<u64, (OutputTx, u64)>,
    /// First ids of requests still counted in the waiting queue (no output yet).
    unstarted: HashSet<u64>,
    /// Set once the link is gone.
    lost: Option<EngineError>,
}

struct Link {
    rank: usize,
    stats: Arc<EngineStats>,
    shared: Arc<Shared>,
    pending: Mutex<Pending>,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn started(&self, p: &mut Pending, first_id: u64) {
        if p.unstarted.remove(&first_id) {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The replica is gone: fail it and end every choice it held.
    fn lose(&self, why: String) {
        let err = EngineError::Failed(format!("data-parallel rank {} {why}", self.rank));
        tracing::error!("{err}");
        self.stats.set_failure(err.to_string());
        let mut p = self.lock();
        for (_, (tx, _)) in p.txs.drain() {
            let _ = tx.send(Err(err.clone()));
        }
        let unstarted = std::mem::take(&mut p.unstarted);
        self.shared.queued.fetch_sub(unstarted.len(), Ordering::SeqCst);
        p.lost = Some(err);
    }

    /// Leader side, one thread: the handle's commands to the wire.
    fn forward(&self, cmds: mpsc::Receiver<Command>, mut out: TcpStream) {
        for cmd in cmds {
            let frame = match cmd {
                Command::Add { first_id, req, txs, .. } => {
                    let mut p = self.lock();
                    if let Some(err) = &p.lost {
                        txs.iter().for_each(|tx| drop(tx.send(Err(err.clone()))));
                        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    for (i, tx) in txs.into_iter().enumerate() {
                        p.txs.insert(first_id + i as u64, (tx, first_id));
                    }
                    p.unstarted.insert(first_id);
                    ToEngine::Add { first_id, req }
                }
                Command::Abort(id) => {
                    let mut p = self.lock();
                    match p.txs.remove(&id) {
                        Some((_, first)) => self.started(&mut p, first),
                        None => continue,
                    }
                    ToEngine::Abort { id }
                }
                Command::AbortAll(err) => ToEngine::AbortAll { err },
                Command::RetireLora(id) => ToEngine::RetireLora { id },
                // KV transfer runs inside an engine, never across this link.
                Command::Unpin(_) | Command::PullDone { .. } | Command::KvRead { .. } | Command::KvWrite { .. } => {
                    continue
                }
            };
            if let Err(e) = out.write_all(&line(&frame)) {
                self.lose(format!("cannot be reached: {e}"));
            }
        }
        let _ = out.shutdown(std::net::Shutdown::Both);
    }

    /// Leader side, one thread: outputs and figures from the wire.
    fn receive(&self, input: TcpStream) {
        let mut reader = BufReader::new(input);
        let mut buf = String::new();
        loop {
            buf.clear();
            match reader.read_line(&mut buf) {
                Ok(0) => return self.lose("disconnected (its pod stopped or crashed)".into()),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return self.lose(format!("sent nothing for {HEARTBEAT_TIMEOUT:?} (hung)"));
                }
                Err(e) => return self.lose(format!("link failed: {e}")),
                Ok(_) if buf.trim().is_empty() => continue,
                Ok(_) => {}
            }
            match serde_json::from_str::<FromEngine>(&buf) {
                Ok(FromEngine::Stats(w)) => self.stats.absorb(w),
                Ok(FromEngine::Output { id, item }) => {
                    let mut p = self.lock();
                    let Some((tx, first)) = p.txs.get(&id).map(|(tx, f)| (tx.clone(), *f)) else { continue };
                    self.started(&mut p, first);
                    let ended = item.as_ref().map_or(true, |o| o.finished.is_some());
                    if ended {
                        p.txs.remove(&id);
                    }
                    let _ = tx.send(item);
                }
                Err(e) => return self.lose(format!("sent an unreadable frame: {e}")),
            }
        }
    }
}

/// A handle to the replica behind `stream` (after the handshake).
fn attach(stream: TcpStream, rank: usize, cfg: EngineConfig) -> Result<EngineHandle, EngineError> {
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::new(cfg.num_blocks, cfg.block_size));
    let shared = Arc::new(Shared::default());
    let link =
        Arc::new(Link { rank, stats: stats.clone(), shared: shared.clone(), pending: Mutex::new(Pending::default()) });
    stream.set_read_timeout(Some(HEARTBEAT_TIMEOUT)).map_err(rpc)?;
    let input = stream.try_clone().map_err(rpc)?;
    let l = link.clone();
    std::thread::Builder::new()
        .name(format!("tessera-dp{rank}-out"))
        .spawn(move || l.forward(cmd_rx, stream))
        .map_err(rpc)?;
    std::thread::Builder::new().name(format!("tessera-dp{rank}-in")).spawn(move || link.receive(input)).map_err(rpc)?;
    Ok(EngineHandle {
        cmd: cmd_tx,
        next_id: Arc::new(AtomicU64::new(1)),
        stats,
        shared,
        live: Arc::new(AtomicUsize::new(0)),
        cfg,
    })
}

/// One handshake line, read a byte at a time: the worker pod may already have sent the next
/// line, which must stay in the socket for whoever reads after us.
fn read_line_within<T: serde::de::DeserializeOwned>(mut s: &TcpStream, within: Duration) -> Result<T, EngineError> {
    s.set_read_timeout(Some(within)).map_err(rpc)?;
    let mut l = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match std::io::Read::read(&mut s, &mut b).map_err(rpc)? {
            0 => return Err(rpc("the connection closed during the handshake")),
            _ if b[0] == b'\n' => break,
            _ if l.len() >= 1 << 20 => return Err(rpc("handshake line over 1 MiB")),
            _ => l.push(b[0]),
        }
    }
    serde_json::from_slice(&l).map_err(rpc)
}

/// On the leader: wait until the replicas of `ranks` have joined `listener` (within
/// `join_timeout`; missing ranks are named) and then loaded (within `load_timeout` each),
/// and return their handles in rank order.
pub fn accept_replicas(
    listener: &TcpListener,
    ranks: Range<usize>,
    join_timeout: Duration,
    load_timeout: Duration,
) -> Result<Vec<EngineHandle>, EngineError> {
    let deadline = Instant::now() + join_timeout;
    let mut joined: HashMap<usize, TcpStream> = HashMap::new();
    listener.set_nonblocking(true).map_err(rpc)?;
    while joined.len() < ranks.len() {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).map_err(rpc)?;
                let Ok(Hello { dp_rank: rank }) = read_line_within::<Hello>(&s, Duration::from_secs(5)) else {
                    tracing::warn!(
                        "ignoring a connection from {peer} to the data-parallel RPC port that did not say hello"
                    );
                    continue;
                };
                let refused = if !ranks.contains(&rank) {
                    format!("data-parallel rank {rank} is not one of the remote ranks {ranks:?}")
                } else {
                    match joined.entry(rank) {
                        std::collections::hash_map::Entry::Occupied(_) => {
                            format!("data-parallel rank {rank} joined twice")
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            tracing::info!("data-parallel rank {rank} joined from {peer}");
                            v.insert(s);
                            continue;
                        }
                    }
                };
                tracing::warn!("refused a data-parallel replica from {peer}: {refused}");
                let _ = s.write_all(&line(&Welcome { refused: Some(refused) }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = ranks.clone().filter(|r| !joined.contains_key(r)).collect();
                    return Err(EngineError::Rpc(format!(
                        "data-parallel ranks {missing:?} never connected to {} within {:.0}s",
                        listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                        join_timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(rpc(e)),
        }
    }
    let mut handles = Vec::with_capacity(ranks.len());
    for rank in ranks {
        let Some(mut s) = joined.remove(&rank) else { continue };
        let ready = read_line_within::<Ready>(&s, load_timeout)
            .map_err(|e| EngineError::Rpc(format!("data-parallel rank {rank} did not load: {e}")))?;
        s.write_all(&line(&Welcome { refused: None })).map_err(rpc)?;
        handles.push(attach(s, rank, ready.cfg)?);
    }
    Ok(handles)
}

/// JSON has no -inf: a banned token's log-probability travels as vLLM's floor, which is
/// what the HTTP front reports for it anyway.
fn finite(mut item: Result<RequestOutput, EngineError>) -> Result<RequestOutput, EngineError> {
    if let Ok(o) = &mut item {
        let prompt = o.prompt_logprobs.iter_mut().flatten().flatten();
        for lp in o.logprobs.iter_mut().chain(prompt) {
            let fix = |v: &mut f32| *v = if v.is_finite() { *v } else { -9999.0 };
            fix(&mut lp.logprob);
            lp.top.iter_mut().for_each(|(_, v)| fix(v));
        }
    }
    item
}

type Tasks = Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>;

/// A worker pod's connection to the leader, joined but not yet serving.
pub struct Joined {
    dp_rank: usize,
    leader: String,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

/// On a worker pod, before loading: join the leader at `leader` as data-parallel replica
/// `dp_rank`, retrying until `timeout`.
pub async fn join_leader(dp_rank: usize, leader: &str, timeout: Duration) -> Result<Joined, EngineError> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match tokio::net::TcpStream::connect(leader).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(EngineError::Rpc(format!(
                    "rank {dp_rank} could not reach the data-parallel leader at {leader} within {:.0}s: {e}",
                    timeout.as_secs_f64()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (rd, mut wr) = stream.into_split();
    wr.write_all(&line(&Hello { dp_rank })).await.map_err(rpc)?;
    Ok(Joined { dp_rank, leader: leader.to_string(), lines: tokio::io::BufReader::new(rd).lines(), wr })
}

impl Joined {
    /// Tell the leader `engine` is loaded, then serve it until the connection ends (an error).
    pub async fn serve(self, engine: EngineHandle) -> Result<(), EngineError> {
        let Joined { dp_rank, leader, mut lines, mut wr } = self;
        wr.write_all(&line(&Ready { cfg: engine.config().clone() })).await.map_err(rpc)?;
        let welcome = lines.next_line().await.map_err(rpc)?.ok_or_else(|| rpc("the leader closed the connection"))?;
        if let Some(why) = serde_json::from_str::<Welcome>(&welcome).map_err(rpc)?.refused {
            return Err(EngineError::Rpc(format!("the leader refused rank {dp_rank}: {why}")));
        }
        tracing::info!("data-parallel rank {dp_rank} serves the leader at {leader}");
        let (out, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<FromEngine>();
        let writer = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if wr.write_all(&line(&f)).await.is_err() {
                    break;
                }
            }
        });
        let (stats, o) = (engine.stats().clone(), out.clone());
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATS_INTERVAL);
            while o.send(FromEngine::Stats(stats.to_wire())).is_ok() {
                tick.tick().await;
            }
        });
        let tasks: Tasks = Arc::default();
        let end = loop {
            let frame = match lines.next_line().await {
                Ok(Some(l)) if l.trim().is_empty() => continue,
                Ok(Some(l)) => l,
                Ok(None) => break format!("the leader at {leader} closed the connection"),
                Err(e) => break format!("the link to the leader at {leader} failed: {e}"),
            };
            match serde_json::from_str::<ToEngine>(&frame) {
                Ok(ToEngine::Add { first_id, req }) => submit(&engine, first_id, *req, &out, &tasks),
                Ok(ToEngine::Abort { id }) => {
                    if let Some(t) = tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                        t.abort();
                    }
                }
                Ok(ToEngine::AbortAll { err }) => engine.abort_all(err),
                Ok(ToEngine::RetireLora { id }) => engine.retire_lora(id),
                Err(e) => break format!("the leader sent an unreadable frame: {e}"),
            }
        };
        for (_, t) in tasks.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            t.abort();
        }
        ticker.abort();
        writer.abort();
        Err(EngineError::Rpc(end))
    }
}

/// Submit one request from the leader and stream each choice back under the leader's ids.
fn submit(
    engine: &EngineHandle,
    first_id: u64,
    req: EngineRequest,
    out: &tokio::sync::mpsc::UnboundedSender<FromEngine>,
    tasks: &Tasks,
) {
    let n = req.params.n.max(1) as u64;
    let streams = match engine.submit(req) {
        Ok(s) => s,
        Err(e) => {
            for id in first_id..first_id + n {
                let _ = out.send(FromEngine::Output { id, item: Err(e.clone()) });
            }
            return;
        }
    };
    let mut held = tasks.lock().unwrap_or_else(|p| p.into_inner());
    for (id, mut stream) in (first_id..).zip(streams) {
        let (out, tasks) = (out.clone(), tasks.clone());
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let ended = item.as_ref().map_or(true, |o| o.finished.is_some());
                if out.send(FromEngine::Output { id, item: finite(item) }).is_err() || ended {
                    break;
                }
            }
            tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
        held.insert(id, task.abort_handle());
    }
}
