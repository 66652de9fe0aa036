//! The [`EngineHandle`] through which the server talks to the engine thread: admission
//! (length checks, the bounded waiting queue, shedding), commands in, per-choice output
//! streams back.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tessera_grammar::Constrained;
use tessera_protocol::TokenLogprobs;
use tessera_protocol::{FinishReason, SamplingParams};
use tessera_runner::Executor;
use tokenizers::Tokenizer;
use tokio::sync::mpsc as tmpsc;

use crate::kv::transfer::client::PullStats;
use crate::kv::transfer::{KvLink, PinnedKv, RemoteSource};
use crate::scheduler::SchedulerConfig;
use crate::stats::EngineStats;
use crate::EngineError;

/// Engine limits fixed at start-up.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EngineConfig {
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    pub scheduler: SchedulerConfig,
    /// Requests that may wait for their first step; past it new requests get 429.
    pub max_queued_requests: usize,
    /// Adapters kept loaded on the ranks (`--max-cpu-loras`), least recently used evicted.
    #[serde(default = "default_resident_loras")]
    pub max_cpu_loras: usize,
    /// The served model's grammar compiler (structured outputs); `None` when its tokenizer
    /// cannot back one. Built where the engine runs, never sent.
    #[serde(skip)]
    pub grammars: Option<tessera_grammar::Grammars>,
}

fn default_resident_loras() -> usize {
    1
}

/// llm-d / KServe criticality of a model: under saturation Sheddable work is refused first,
/// Critical work may preempt lower classes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Criticality {
    Critical,
    #[default]
    Standard,
    Sheddable,
}

impl Criticality {
    /// Scheduling class: smaller runs first.
    pub fn class(self) -> u8 {
        self as u8
    }
}

impl FromStr for Criticality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "critical" => Ok(Self::Critical),
            "standard" => Ok(Self::Standard),
            "sheddable" => Ok(Self::Sheddable),
            _ => Err(format!("unknown criticality `{s}` (expected Critical, Standard or Sheddable)")),
        }
    }
}

/// KV usage from which the engine counts as saturated (Sheddable requests are refused).
pub const SATURATION_KV_USAGE: f64 = 0.8;

/// A tokenised request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub criticality: Criticality,
    /// A decode leg: where the prompt's KV was prefilled.
    #[serde(default)]
    pub remote: Option<RemoteSource>,
    /// The LoRA adapter to run on (the base model when `None`).
    #[serde(default)]
    pub lora: Option<LoraRequest>,
}

/// A request's LoRA adapter: the id the engine and the ranks know it by (unique per
/// registration, so a re-registered name never reuses cached KV), its name and the local
/// directory of its PEFT files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoraRequest {
    pub id: u32,
    pub name: String,
    pub path: std::path::PathBuf,
}

/// How a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// One increment of a choice's output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token of `token_ids` when log-probabilities were asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// With the first output of a request that asked for prompt log-probabilities: one entry
    /// per prompt token, `None` for the first (nothing predicts it).
    #[serde(default)]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub finished: Option<Finished>,
    /// With the last output of a prefill leg: its blocks, kept for the decode worker.
    #[serde(default)]
    pub kv_pinned: Option<PinnedKv>,
}

pub(crate) type OutputTx = tmpsc::UnboundedSender<Result<RequestOutput, EngineError>>;

pub(crate) enum Command {
    /// A request with `txs.len()` choices, ids `first_id..`.
    Add {
        first_id: u64,
        req: Box<EngineRequest>,
        txs: Vec<OutputTx>,
        arrival: Instant,
        /// The compiled structured output (each choice starts from a copy).
        grammar: Option<Box<Constrained>>,
    },
    Abort(u64),
    /// Free the blocks pinned under a sequence (its KV has been sent).
    Unpin(u64),
    /// Read every rank's bytes of these blocks through the executor (between steps).
    KvRead {
        blocks: Vec<u32>,
        reply: mpsc::Sender<Result<Vec<u8>, String>>,
    },
    /// Write them through the executor.
    KvWrite {
        blocks: Vec<u32>,
        data: Vec<u8>,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// A KV pull has ended.
    PullDone {
        seq: u64,
        result: Result<PullStats, String>,
    },
    /// End every request with this error (shutdown past its deadline).
    AbortAll(EngineError),
    /// An adapter was unloaded over HTTP: drop it from the ranks once no sequence uses it.
    RetireLora(u32),
}

/// The receiving end of one choice. Dropping it cancels the choice.
pub struct RequestStream {
    id: u64,
    rx: tmpsc::UnboundedReceiver<Result<RequestOutput, EngineError>>,
    cmd: mpsc::Sender<Command>,
    live: Arc<AtomicUsize>,
}

impl RequestStream {
    /// Next output increment; `None` once the choice has ended.
    pub async fn next(&mut self) -> Option<Result<RequestOutput, EngineError>> {
        self.rx.recv().await
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        // If the engine is gone there is nothing to cancel.
        let _ = self.cmd.send(Command::Abort(self.id));
    }
}

/// Counters shared by the handle and the engine thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Requests admitted but not yet scheduled for the first time.
    pub queued: AtomicUsize,
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) cmd: mpsc::Sender<Command>,
    pub(crate) next_id: Arc<AtomicU64>,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) live: Arc<AtomicUsize>,
    pub(crate) cfg: EngineConfig,
}

impl EngineHandle {
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Choices whose output stream is still held by someone.
    pub fn live_streams(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Whether new work would only wait: every batch slot taken or the KV cache nearly full.
    pub fn saturated(&self) -> bool {
        self.stats.running.load(Ordering::Relaxed) >= self.cfg.scheduler.max_num_seqs
            || self.stats.kv_usage() >= SATURATION_KV_USAGE
    }

    /// Check that a request can ever run, and resolve its `max_tokens`.
    /// Check `req` against the engine's limits (fixing its `max_tokens`) and compile its
    /// structured output, if any.
    fn admit(&self, req: &mut EngineRequest) -> Result<Option<Constrained>, EngineError> {
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
        let Some(s) = &req.params.constraint else { return Ok(None) };
        let invalid = |message: String| EngineError::Invalid { message, param: s.param.clone() };
        let grammars = self.cfg.grammars.as_ref().ok_or_else(|| {
            invalid(format!("`{}`: structured outputs are not available for this model's tokenizer", s.param))
        })?;
        let compiled = grammars.compile(&s.constraint).map_err(|e| invalid(format!("`{}`: {e}", s.param)))?;
        Ok(Some(compiled))
    }

    /// Submit a request; each of its `n` choices streams on its own [`RequestStream`].
    pub fn submit(&self, mut req: EngineRequest) -> Result<Vec<RequestStream>, EngineError> {
        if let Some(why) = self.stats.failure() {
            return Err(EngineError::Failed(why));
        }
        let grammar = self.admit(&mut req)?;
        if req.criticality == Criticality::Sheddable && self.saturated() {
            return Err(EngineError::Overloaded(
                "the server is saturated and this model's requests are sheddable; retry later".into(),
            ));
        }
        let max = self.cfg.max_queued_requests;
        self.shared.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| (q < max).then_some(q + 1)).map_err(
            |q| EngineError::Overloaded(format!("the waiting queue is full ({q} requests waiting); retry later")),
        )?;
        let n = req.params.n.max(1);
        let first_id = self.next_id.fetch_add(n as u64, Ordering::Relaxed);
        let (mut txs, mut streams) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n as u64 {
            let (tx, rx) = tmpsc::unbounded_channel();
            txs.push(tx);
            self.live.fetch_add(1, Ordering::SeqCst);
            streams.push(RequestStream { id: first_id + i, rx, cmd: self.cmd.clone(), live: self.live.clone() });
        }
        let grammar = grammar.map(Box::new);
        let add = Command::Add { first_id, req: Box::new(req), txs, arrival: Instant::now(), grammar };
        if self.cmd.send(add).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(streams)
    }

    /// The adapter `id` was unregistered: the ranks drop it once no sequence uses it.
    pub fn retire_lora(&self, id: u32) {
        let _ = self.cmd.send(Command::RetireLora(id));
    }

    /// End every request now with `err` (their streams get it as the last item).
    pub fn abort_all(&self, err: EngineError) {
        let _ = self.cmd.send(Command::AbortAll(err));
    }
}

/// Start the engine thread; with `kv`, it takes part in prefill/decode KV transfer (and
/// serves pulls on the link's listener).
pub fn spawn(
    cfg: EngineConfig,
    executor: Box<dyn Executor>,
    tokenizer: Tokenizer,
    eos_token_ids: Vec<u32>,
    kv: Option<KvLink>,
) -> EngineHandle {
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::new(cfg.num_blocks, cfg.block_size));
    if let Ok(mut paths) = stats.kernel_paths.lock() {
        *paths = executor.kernel_paths();
    }
    let shared = Arc::new(Shared::default());
    let kv = kv.map(|link| crate::looper::KvSide::start(link, stats.clone(), cmd_tx.clone()));
    let core = crate::looper::Core::new(&cfg, executor, tokenizer, eos_token_ids, stats.clone(), shared.clone(), kv);
    std::thread::Builder::new()
        .name("tessera-engine".into())
        .spawn(move || core.run(cmd_rx))
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!("cannot start the engine thread: {e}"));
    EngineHandle {
        cmd: cmd_tx,
        next_id: Arc::new(AtomicU64::new(1)),
        stats,
        shared,
        live: Arc::new(AtomicUsize::new(0)),
        cfg,
    }
}
