//! The engine's side of prefill/decode KV transfer: pinning a prefill leg's blocks, expiring
//! pins nobody pulled, starting pulls for decode legs and taking their results.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tessera_runner::KvBlockStore;

use super::Core;
use crate::core::Command;
use crate::kv::transfer::client::{self, PullStats};
use crate::kv::transfer::{new_token, server, Fallback, KvLayout, KvLink, KvStore, Pin, PinnedKv, Pins};
use crate::scheduler::PullJob;
use crate::stats::EngineStats;

pub(crate) struct KvSide {
    engine_id: String,
    host: String,
    port: u16,
    layout: KvLayout,
    store: Arc<dyn KvBlockStore>,
    pins: Arc<Pins>,
    pin_timeout: Duration,
    pull_timeout: Duration,
    cmd: mpsc::Sender<Command>,
}

impl KvSide {
    /// Take the link, starting its transfer service if it has a listener.
    pub(crate) fn start(link: KvLink, stats: Arc<EngineStats>, cmd: mpsc::Sender<Command>) -> Self {
        let pins = Arc::new(Pins::default());
        let store: Arc<dyn KvBlockStore> = match link.store {
            KvStore::Shared(s) => s,
            KvStore::Executor { num_layers, block_bytes } => {
                Arc::new(ExecutorStore { cmd: cmd.clone(), num_layers, block_bytes })
            }
        };
        if let Some(listener) = link.listener {
            let svc = server::Service {
                engine_id: link.engine_id.clone(),
                layout: link.layout.clone(),
                store: store.clone(),
                pins: pins.clone(),
                stats,
                unpin: {
                    let cmd = cmd.clone();
                    Box::new(move |seq| {
                        let _ = cmd.send(Command::Unpin(seq));
                    })
                },
            };
            server::start(listener, svc);
        }
        Self {
            engine_id: link.engine_id,
            host: link.host,
            port: link.port,
            layout: link.layout,
            store,
            pins,
            pin_timeout: link.pin_timeout,
            pull_timeout: link.pull_timeout,
            cmd,
        }
    }
}

/// KV bytes of ranks in other processes: asked of the engine thread, which reads and writes
/// them through its executor between steps.
struct ExecutorStore {
    cmd: mpsc::Sender<Command>,
    num_layers: usize,
    block_bytes: usize,
}

impl ExecutorStore {
    fn ask<T>(&self, make: impl FnOnce(mpsc::Sender<Result<T, String>>) -> Command) -> tessera_runner::Result<T> {
        let err = |e: String| tessera_runner::RunnerError::Plan(e);
        let (tx, rx) = mpsc::channel();
        self.cmd.send(make(tx)).map_err(|_| err("the engine has stopped".into()))?;
        rx.recv().map_err(|_| err("the engine has stopped".into()))?.map_err(err)
    }
}

impl KvBlockStore for ExecutorStore {
    fn num_layers(&self) -> usize {
        self.num_layers
    }
    fn block_bytes(&self) -> usize {
        self.block_bytes
    }
    fn read_all(&self, blocks: &[u32]) -> tessera_runner::Result<Vec<u8>> {
        self.ask(|reply| Command::KvRead { blocks: blocks.to_vec(), reply })
    }
    fn write_all(&self, blocks: &[u32], data: &[u8]) -> tessera_runner::Result<()> {
        self.ask(|reply| Command::KvWrite { blocks: blocks.to_vec(), data: data.to_vec(), reply })
    }
}

impl Core {
    /// Keep a finished prefill leg's blocks for the decode worker, under a fresh token.
    pub(super) fn pin_prefill(&mut self, id: u64, num_tokens: usize) -> Option<PinnedKv> {
        let kv = self.kv.as_ref()?;
        let blocks = self.sched.pin(id);
        let token = new_token();
        let deadline = Instant::now() + kv.pin_timeout;
        kv.pins.insert(token.clone(), Pin { seq: id, blocks: blocks.clone(), num_tokens, deadline });
        // Before the answer goes out, so that a scrape after it sees the pin.
        self.publish_pins();
        Some(PinnedKv {
            block_ids: blocks,
            token,
            num_tokens,
            engine_id: kv.engine_id.clone(),
            host: kv.host.clone(),
            port: kv.port,
            tp_size: kv.layout.tp_size,
        })
    }

    pub(super) fn publish_pins(&self) {
        self.stats.kv.pinned_blocks.store(self.sched.kv().num_pinned_blocks(), Ordering::Relaxed);
    }

    pub(super) fn unpin(&mut self, seq: u64) {
        self.sched.unpin(seq);
        self.publish_pins();
    }

    /// Free the pins past their deadline.
    pub(super) fn expire_pins(&mut self) {
        let Some(kv) = &self.kv else { return };
        let expired = kv.pins.take_expired(Instant::now());
        for seq in expired {
            tracing::info!("KV of prefilled request {seq} was not pulled in time; its blocks are freed");
            self.stats.kv.pins_expired.fetch_add(1, Ordering::Relaxed);
            self.unpin(seq);
        }
    }

    /// How long an idle engine may sleep before a pin expires (None: until a command comes).
    pub(super) fn idle_wait(&self) -> Option<Duration> {
        let deadline = self.kv.as_ref()?.pins.next_deadline()?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    /// Start each pull on its own thread; the result comes back as [`Command::PullDone`].
    pub(super) fn start_pulls(&mut self, pulls: Vec<PullJob>) {
        let Some(kv) = &self.kv else { return };
        for job in pulls {
            let (layout, store, timeout, cmd) = (kv.layout.clone(), kv.store.clone(), kv.pull_timeout, kv.cmd.clone());
            let seq = job.seq_id;
            let run = move || {
                let result = client::pull(&job.source, &job.remote, &job.local, &layout, store.as_ref(), timeout);
                let _ = cmd.send(Command::PullDone { seq: job.seq_id, result });
            };
            if let Err(e) = std::thread::Builder::new().name("tessera-kv-pull".into()).spawn(run) {
                let _ = kv.cmd.send(Command::PullDone { seq, result: Err(format!("cannot start a pull thread: {e}")) });
            }
        }
    }

    pub(super) fn pull_done(&mut self, seq: u64, result: Result<PullStats, String>) {
        let ok = match result {
            Ok(s) => {
                let kv = &self.stats.kv;
                kv.blocks_received.fetch_add(s.blocks as u64, Ordering::Relaxed);
                kv.bytes_received.fetch_add(s.bytes as u64, Ordering::Relaxed);
                kv.latency.observe(s.seconds);
                true
            }
            Err(why) => {
                tracing::warn!("KV pull for request {seq} failed ({why}); computing its prompt here");
                self.stats.kv.fallback(Fallback::PullFailed);
                false
            }
        };
        self.sched.pull_done(seq, ok);
    }
}
