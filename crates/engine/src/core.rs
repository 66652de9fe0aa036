//! The engine loop on its own thread, and the [`EngineHandle`] through which the server
//! talks to it (commands in, per-request output streams back).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use tessera_protocol::{FinishReason, SamplingParams};
use tessera_runner::{Executor, SamplingConfig};
use tokenizers::Tokenizer;
use tokio::sync::mpsc as tmpsc;

use crate::detok::{Detokenizer, OutputText};
use crate::kv::KvCacheManager;
use crate::scheduler::{Scheduler, SchedulerConfig, Sequence};
use crate::stats::EngineStats;
use crate::EngineError;

/// Engine limits fixed at start-up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    pub scheduler: SchedulerConfig,
}

/// A tokenised request.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// One increment of a request's output.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finished: Option<Finished>,
}

enum Command {
    Add { id: u64, req: EngineRequest, tx: tmpsc::UnboundedSender<Result<RequestOutput, EngineError>> },
    Abort(u64),
}

/// The receiving end of one request. Dropping it cancels the request.
pub struct RequestStream {
    id: u64,
    rx: tmpsc::UnboundedReceiver<Result<RequestOutput, EngineError>>,
    cmd: mpsc::Sender<Command>,
}

impl RequestStream {
    /// Next output increment; `None` once the request has ended.
    pub async fn next(&mut self) -> Option<Result<RequestOutput, EngineError>> {
        self.rx.recv().await
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // If the engine is gone there is nothing to cancel.
        let _ = self.cmd.send(Command::Abort(self.id));
    }
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    cmd: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
}

impl EngineHandle {
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Check that a request can ever run, and resolve its `max_tokens`.
    fn admit(&self, req: &mut EngineRequest) -> Result<(), EngineError> {
        let (len, max_len) = (req.prompt.len(), self.cfg.max_model_len);
        if len == 0 {
            return Err(EngineError::TooLong("the prompt is empty".into()));
        }
        if len >= max_len {
            return Err(EngineError::TooLong(format!(
                "This model's maximum context length is {max_len} tokens. However, your prompt has {len} tokens; \
                 reduce the prompt so that at least one token can be generated."
            )));
        }
        let max_tokens = req.params.max_tokens.unwrap_or(max_len - len);
        if len + max_tokens > max_len {
            return Err(EngineError::TooLong(format!(
                "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
                 ({len} in the prompt, {max_tokens} for the completion). Reduce the prompt or max_tokens.",
                len + max_tokens
            )));
        }
        let capacity = self.cfg.num_blocks * self.cfg.block_size;
        if len + max_tokens > capacity {
            return Err(EngineError::TooLong(format!(
                "prompt ({len} tokens) + max_tokens ({max_tokens}) exceeds the KV cache capacity of {capacity} tokens"
            )));
        }
        req.params.max_tokens = Some(max_tokens);
        Ok(())
    }

    /// Submit a request; outputs arrive on the returned stream.
    pub fn submit(&self, mut req: EngineRequest) -> Result<RequestStream, EngineError> {
        self.admit(&mut req)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tmpsc::unbounded_channel();
        self.cmd.send(Command::Add { id, req, tx }).map_err(|_| EngineError::Stopped)?;
        Ok(RequestStream { id, rx, cmd: self.cmd.clone() })
    }
}

struct RequestState {
    tx: tmpsc::UnboundedSender<Result<RequestOutput, EngineError>>,
    detok: Detokenizer,
    text: OutputText,
    max_tokens: usize,
    prompt_len: usize,
    cached_tokens: usize,
    ignore_eos: bool,
}

/// Start the engine thread.
pub fn spawn(
    cfg: EngineConfig,
    executor: Box<dyn Executor>,
    tokenizer: Tokenizer,
    eos_token_ids: Vec<u32>,
) -> EngineHandle {
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::new(cfg.num_blocks, cfg.block_size));
    let core = Core {
        sched: Scheduler::new(
            cfg.scheduler.clone(),
            KvCacheManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
        ),
        executor,
        tokenizer,
        eos: eos_token_ids,
        requests: HashMap::new(),
        stats: stats.clone(),
        max_model_len: cfg.max_model_len,
        seeds: RandomState::new(),
    };
    std::thread::Builder::new()
        .name("tessera-engine".into())
        .spawn(move || core.run(cmd_rx))
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!("cannot start the engine thread: {e}"));
    EngineHandle { cmd: cmd_tx, next_id: Arc::new(AtomicU64::new(1)), stats, cfg }
}

struct Core {
    sched: Scheduler,
    executor: Box<dyn Executor>,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    requests: HashMap<u64, RequestState>,
    stats: Arc<EngineStats>,
    max_model_len: usize,
    seeds: RandomState,
}

impl Core {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            self.drop_disconnected();
            if !self.sched.is_idle() {
                self.step();
            }
            self.publish();
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Add { id, req, tx } => {
                let p = &req.params;
                let sampling = SamplingConfig {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: p.top_k,
                    seed: p.seed.unwrap_or_else(|| self.seeds.hash_one(id)),
                };
                self.requests.insert(
                    id,
                    RequestState {
                        tx,
                        detok: Detokenizer::new(&req.prompt),
                        text: OutputText::new(p.stop.clone()),
                        max_tokens: p.max_tokens.unwrap_or(self.max_model_len),
                        prompt_len: req.prompt.len(),
                        cached_tokens: 0,
                        ignore_eos: p.ignore_eos,
                    },
                );
                self.stats.prompt_tokens.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
                self.sched.add(Sequence::new(id, req.prompt, sampling));
            }
            Command::Abort(id) => {
                if self.requests.remove(&id).is_some() {
                    self.sched.remove(id);
                }
            }
        }
    }

    fn drop_disconnected(&mut self) {
        let gone: Vec<u64> = self.requests.iter().filter(|(_, r)| r.tx.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.requests.remove(&id);
            self.sched.remove(id);
        }
    }

    fn step(&mut self) {
        let out = self.sched.schedule();
        if out.plan.seqs.is_empty() {
            // Nothing could be scheduled (should not happen with admission checks); avoid spinning.
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        for &(id, cached) in &out.prefix_hits {
            if let Some(r) = self.requests.get_mut(&id) {
                r.cached_tokens = r.cached_tokens.max(cached.min(r.prompt_len));
            }
        }
        self.stats.record_step(&out.plan, out.preempted.len());
        let results = match self.executor.execute(&out.plan) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for s in &out.plan.seqs {
                    self.sched.remove(s.seq_id);
                    if let Some(r) = self.requests.remove(&s.seq_id) {
                        let _ = r.tx.send(Err(EngineError::Step(e.to_string())));
                    }
                }
                return;
            }
        };
        for (id, token) in self.sched.apply(&results) {
            self.on_token(id, token);
        }
    }

    fn on_token(&mut self, id: u64, token: u32) {
        let Some(seq_len) = self.sched.get(id).map(|s| s.tokens.len()) else {
            return;
        };
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
        let n_out = seq_len - r.prompt_len;
        let mut reason = None;
        if !r.ignore_eos && self.eos.contains(&token) {
            reason = Some(FinishReason::Stop);
        } else {
            let delta = r.detok.push(&self.tokenizer, token);
            if r.text.append(&delta) {
                reason = Some(FinishReason::Stop);
            }
        }
        if reason.is_none() && (n_out >= r.max_tokens || seq_len >= self.max_model_len) {
            reason = Some(FinishReason::Length);
        }
        let finished = reason.map(|reason| Finished {
            reason,
            prompt_tokens: r.prompt_len,
            completion_tokens: n_out,
            cached_tokens: r.cached_tokens,
        });
        let text = r.text.take_sendable(finished.is_some());
        let sent = r.tx.send(Ok(RequestOutput { text, token_ids: vec![token], finished }));
        if finished.is_some() || sent.is_err() {
            self.requests.remove(&id);
            self.sched.remove(id);
            if let Some(f) = finished {
                self.stats.record_finish(f.reason);
            }
        }
    }

    fn publish(&self) {
        self.stats.publish(
            self.sched.num_running(),
            self.sched.num_waiting(),
            self.sched.kv().usage(),
            self.sched.kv().num_free(),
            self.sched.kv().stats(),
        );
    }
}
