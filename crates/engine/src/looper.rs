//! The engine loop on its own thread: takes commands, schedules and executes steps, turns
//! sampled tokens into per-choice outputs (text, stop conditions, log-probabilities) and
//! records timings.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tessera_grammar::{Constrained, GrammarHandle};
use tessera_protocol::{FinishReason, SamplingParams};
use tessera_runner::{Executor, SamplingConfig, StepResult, TokenLogprobs};
use tokenizers::Tokenizer;

mod kv;
mod lora;

pub(crate) use kv::KvSide;
use lora::LoraSlots;

use crate::core::{Command, EngineConfig, Finished, OutputTx, RequestOutput, Shared};
use crate::detok::{Detokenizer, OutputText};
use crate::kv::KvCacheManager;
use crate::scheduler::{Scheduler, Sequence};
use crate::stats::EngineStats;
use crate::EngineError;

/// Longest wait of an idle lockstep engine before it meets the other replicas again: the
/// most a busy replica's step can wait for an idle one (the poll shrinks to zero while any
/// replica is busy and doubles from 1 ms while all are idle).
const MAX_IDLE_POLL: Duration = Duration::from_millis(20);

struct RequestState {
    tx: OutputTx,
    detok: Detokenizer,
    text: OutputText,
    max_tokens: usize,
    min_tokens: usize,
    prompt_len: usize,
    cached_tokens: usize,
    ignore_eos: bool,
    stop_ids: Vec<u32>,
    include_stop: bool,
    /// Counted in [`Shared::queued`] until first scheduled.
    queued: bool,
    arrival: Instant,
    last_token: Option<Instant>,
    /// Prompt log-probabilities by position, filled as prefill chunks run; sent with the
    /// first output.
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// A prefill leg: its blocks are pinned for the decode worker when it finishes.
    produce: bool,
}

pub(crate) struct Core {
    sched: Scheduler,
    executor: Box<dyn Executor>,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    requests: HashMap<u64, RequestState>,
    /// Further choices of a request, started once the first choice's prompt is computed.
    forks: HashMap<u64, Vec<Sequence>>,
    stats: Arc<EngineStats>,
    shared: Arc<Shared>,
    max_model_len: usize,
    seeds: RandomState,
    kv: Option<KvSide>,
    lora: LoraSlots,
}

fn sampling_config(p: &SamplingParams, seed: u64, stop_ids: Vec<u32>) -> SamplingConfig {
    SamplingConfig {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p.logit_bias.clone(),
        min_tokens: p.min_tokens,
        stop_ids,
        logprobs: p.logprobs,
        prompt_logprobs: p.prompt_logprobs,
        grammar: None,
    }
}

impl Core {
    pub(crate) fn new(
        cfg: &EngineConfig,
        executor: Box<dyn Executor>,
        tokenizer: Tokenizer,
        eos: Vec<u32>,
        stats: Arc<EngineStats>,
        shared: Arc<Shared>,
        kv: Option<KvSide>,
    ) -> Self {
        Self {
            sched: Scheduler::new(
                cfg.scheduler.clone(),
                KvCacheManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            ),
            executor,
            tokenizer,
            eos,
            requests: HashMap::new(),
            forks: HashMap::new(),
            stats,
            shared,
            max_model_len: cfg.max_model_len,
            seeds: RandomState::new(),
            kv,
            lora: LoraSlots::new(cfg.max_cpu_loras),
        }
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut idle_poll = Duration::ZERO;
        loop {
            if self.sched.is_idle() && self.executor.lockstep() && self.stats.failure().is_none() {
                // Data-parallel expert parallelism: keep meeting the other replicas' steps.
                match rx.recv_timeout(idle_poll) {
                    Ok(c) => self.handle(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        idle_poll = match self.tick() {
                            true => Duration::ZERO,
                            false => (idle_poll * 2).clamp(Duration::from_millis(1), MAX_IDLE_POLL),
                        };
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else if self.sched.is_idle() {
                // Pinned KV expires even when nothing else happens.
                match self.idle_wait() {
                    None => match rx.recv() {
                        Ok(c) => self.handle(c),
                        Err(_) => return,
                    },
                    Some(wait) => match rx.recv_timeout(wait) {
                        Ok(c) => self.handle(c),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    },
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            self.expire_pins();
            self.drop_disconnected();
            if !self.sched.is_idle() {
                self.step();
            }
            self.publish();
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Add { first_id, req, txs, arrival, grammar } => {
                if let Some(why) = self.stats.failure() {
                    for tx in txs {
                        let _ = tx.send(Err(EngineError::Failed(why.clone())));
                    }
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                self.add(first_id, *req, txs, arrival, grammar)
            }
            Command::Abort(id) => self.end(id, None),
            Command::Unpin(seq) => self.unpin(seq),
            Command::PullDone { seq, result } => self.pull_done(seq, result),
            Command::KvRead { blocks, reply } => {
                let _ = reply.send(self.executor.kv_read(&blocks).map_err(|e| e.to_string()));
                self.check_executor();
            }
            Command::KvWrite { blocks, data, reply } => {
                let _ = reply.send(self.executor.kv_write(&blocks, &data).map_err(|e| e.to_string()));
                self.check_executor();
            }
            Command::RetireLora(id) => self.lora.retire(id),
            Command::AbortAll(err) => {
                let ids: Vec<u64> = self.requests.keys().copied().collect();
                for id in ids {
                    self.end(id, Some(Err(err.clone())));
                }
            }
        }
    }

    fn add(
        &mut self,
        first_id: u64,
        req: crate::EngineRequest,
        txs: Vec<OutputTx>,
        arrival: Instant,
        grammar: Option<Box<Constrained>>,
    ) {
        if let Some(l) = &req.lora {
            self.lora.note(l);
        }
        let p = &req.params;
        let mut banned = p.stop_token_ids.clone();
        if !p.ignore_eos {
            banned.extend_from_slice(&self.eos);
        }
        let base_seed = p.seed.unwrap_or_else(|| self.seeds.hash_one(first_id));
        let class = req.criticality.class();
        let mut children = Vec::new();
        for (i, tx) in txs.into_iter().enumerate() {
            let id = first_id + i as u64;
            self.requests.insert(
                id,
                RequestState {
                    tx,
                    detok: Detokenizer::new(&req.prompt, p.skip_special_tokens),
                    text: OutputText::new(p.stop.clone(), p.include_stop_str_in_output),
                    max_tokens: p.max_tokens.unwrap_or(self.max_model_len),
                    min_tokens: p.min_tokens,
                    prompt_len: req.prompt.len(),
                    cached_tokens: 0,
                    ignore_eos: p.ignore_eos,
                    stop_ids: p.stop_token_ids.clone(),
                    include_stop: p.include_stop_str_in_output,
                    queued: i == 0,
                    arrival,
                    last_token: None,
                    // Every choice computes its own prompt then (no shared blocks, no prefix cache).
                    prompt_logprobs: p.prompt_logprobs.is_some().then(|| vec![None; req.prompt.len()]),
                    produce: p.kv == tessera_protocol::KvIntent::RemoteDecode,
                },
            );
            // Each choice draws from its own stream; choice 0 keeps the request's seed.
            let seed = base_seed.wrapping_add((i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
            let mut sampling = sampling_config(p, seed, banned.clone());
            // Every choice follows the grammar from its start, on its own copy.
            sampling.grammar = grammar.as_ref().map(|g| GrammarHandle::new(g.fork()));
            let mut seq = Sequence::new(id, req.prompt.clone(), sampling).with_priority(class, p.priority);
            seq.lora = req.lora.as_ref().map(|l| l.id);
            if self.kv.is_some() && i == 0 {
                seq.remote = req.remote.clone().map(Box::new);
            }
            if i == 0 {
                self.sched.add(seq);
            } else {
                children.push(seq);
            }
        }
        if !children.is_empty() {
            self.forks.insert(first_id, children);
        }
        self.stats.prompt_tokens.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
    }

    /// Start the pending further choices of `parent`, sharing its prompt blocks when `share`.
    fn release_forks(&mut self, parent: u64, share: bool) {
        for child in self.forks.remove(&parent).unwrap_or_default() {
            if !self.requests.contains_key(&child.id) {
                continue;
            }
            if share {
                self.sched.add_fork(child, parent);
            } else {
                self.sched.add(child);
            }
        }
    }

    /// End a choice: free its blocks, start its pending siblings, and send `last` if given.
    fn end(&mut self, id: u64, last: Option<Result<RequestOutput, EngineError>>) {
        self.sched.remove(id);
        self.release_forks(id, false);
        for pending in self.forks.values_mut() {
            pending.retain(|s| s.id != id);
        }
        if let Some(r) = self.requests.remove(&id) {
            if r.queued {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
            match last {
                Some(Ok(out)) => {
                    if let Some(f) = out.finished {
                        self.stats.record_finish(f.reason, r.arrival.elapsed().as_secs_f64());
                    }
                    let _ = r.tx.send(Ok(out));
                }
                Some(Err(e)) => {
                    self.stats.record_finish(FinishReason::Abort, r.arrival.elapsed().as_secs_f64());
                    let _ = r.tx.send(Err(e));
                }
                None => self.stats.record_finish(FinishReason::Abort, r.arrival.elapsed().as_secs_f64()),
            }
        }
    }

    fn drop_disconnected(&mut self) {
        let gone: Vec<u64> = self.requests.iter().filter(|(_, r)| r.tx.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.end(id, None);
        }
    }

    fn step(&mut self) {
        let mut out = self.sched.schedule();
        let pulls = std::mem::take(&mut out.pulls);
        let pulling = !pulls.is_empty();
        self.start_pulls(pulls);
        if out.plan.seqs.is_empty() {
            if pulling {
                return;
            }
            // Nothing could be scheduled (should not happen with admission checks); avoid
            // spinning, but still meet the other replicas' step under lockstep.
            if !(self.executor.lockstep() && self.tick()) {
                std::thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        let now = Instant::now();
        for s in &out.plan.seqs {
            if let Some(r) = self.requests.get_mut(&s.seq_id) {
                if r.queued {
                    r.queued = false;
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    self.stats.queue_time.observe((now - r.arrival).as_secs_f64());
                }
            }
        }
        for &(id, cached) in &out.prefix_hits {
            if let Some(r) = self.requests.get_mut(&id) {
                r.cached_tokens = r.cached_tokens.max(cached.min(r.prompt_len));
            }
        }
        if self.lora.in_use() {
            let (running, waiting) = self.sched.loras();
            self.lora.prepare(&mut out.plan, &[running, waiting].concat());
        }
        self.stats.record_step(&out.plan, out.preempted.len());
        let prompt_computed: usize = (out.plan.seqs.iter())
            .filter_map(|s| {
                let prompt = self.requests.get(&s.seq_id)?.prompt_len;
                Some((s.start_pos + s.tokens.len()).min(prompt).saturating_sub(s.start_pos))
            })
            .sum();
        self.stats.prompt_tokens_computed.fetch_add(prompt_computed as u64, Ordering::Relaxed);
        self.stats.record_prefix(self.sched.kv().stats());
        let results = match self.executor.execute(&out.plan) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                self.lora.step_failed(&out.plan.lora_ops);
                // A dead executor is recorded before anyone is answered, so that /health is
                // already 503 when a client sees its request fail.
                if let Some(why) = self.executor.failure() {
                    self.stats.set_failure(why);
                }
                for s in &out.plan.seqs {
                    self.end(s.seq_id, Some(Err(EngineError::Step(e.to_string()))));
                }
                self.check_executor();
                return;
            }
        };
        for r in results.iter().filter(|r| !r.prompt_logprobs.is_empty()) {
            let start = out.plan.seqs.iter().find(|s| s.seq_id == r.seq_id).map_or(0, |s| s.start_pos);
            if let Some(slots) = self.requests.get_mut(&r.seq_id).and_then(|q| q.prompt_logprobs.as_mut()) {
                // Row `i` of the chunk predicts the prompt token at `start + i + 1`.
                for (i, lp) in r.prompt_logprobs.iter().enumerate() {
                    if let Some(slot) = slots.get_mut(start + i + 1) {
                        *slot = Some(lp.clone());
                    }
                }
            }
        }
        for r in self.sched.apply(&results) {
            self.on_token(r);
        }
    }

    /// If the executor can no longer run steps (a lost rank), fail the engine and every request.
    fn check_executor(&mut self) {
        if let Some(why) = self.executor.failure() {
            tracing::error!("the engine cannot continue: {why}; /health is 503 from now on");
            self.stats.set_failure(why.clone());
            let ids: Vec<u64> = self.requests.keys().copied().collect();
            for id in ids {
                self.end(id, Some(Err(EngineError::Failed(why.clone()))));
            }
        }
    }

    /// Lockstep with nothing to run: take part in other replicas' step. Whether one ran.
    fn tick(&mut self) -> bool {
        match self.executor.tick() {
            Ok(ran) => ran,
            Err(e) => {
                tracing::error!("idle step with the other data-parallel replicas failed: {e}");
                self.check_executor();
                false
            }
        }
    }

    fn on_token(&mut self, res: StepResult) {
        let id = res.seq_id;
        let Some(token) = res.token else { return };
        let Some(seq_len) = self.sched.get(id).map(|s| s.tokens.len()) else {
            return;
        };
        if self.forks.contains_key(&id) {
            // The prompt is computed: the other choices can share its blocks now.
            self.release_forks(id, true);
        }
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        match r.last_token {
            None => self.stats.ttft.observe((now - r.arrival).as_secs_f64()),
            Some(t) => self.stats.itl.observe((now - t).as_secs_f64()),
        }
        r.last_token = Some(now);
        let prompt_logprobs = r.prompt_logprobs.take();
        if r.max_tokens == 0 {
            // A scoring request: the prompt is computed, the sampled token is not output.
            let finished = Finished {
                reason: FinishReason::Length,
                prompt_tokens: r.prompt_len,
                completion_tokens: 0,
                cached_tokens: r.cached_tokens,
            };
            let out = RequestOutput {
                text: String::new(),
                token_ids: vec![],
                logprobs: vec![],
                prompt_logprobs,
                finished: Some(finished),
                kv_pinned: None,
            };
            self.end(id, Some(Ok(out)));
            return;
        }
        self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
        let n_out = seq_len - r.prompt_len;
        let mut reason = None;
        let stop_token = (!r.ignore_eos && self.eos.contains(&token)) || r.stop_ids.contains(&token);
        if stop_token && n_out > r.min_tokens {
            reason = Some(FinishReason::Stop);
            if r.include_stop {
                let delta = r.detok.push(&self.tokenizer, token);
                r.text.append(&delta, false);
            }
        } else {
            let delta = r.detok.push(&self.tokenizer, token);
            if r.text.append(&delta, n_out > r.min_tokens) {
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
        let (produce, prompt_len) = (r.produce, r.prompt_len);
        let mut out = RequestOutput {
            text: r.text.take_sendable(finished.is_some()),
            token_ids: vec![token],
            logprobs: res.logprobs.into_iter().collect(),
            prompt_logprobs,
            finished,
            kv_pinned: None,
        };
        if finished.is_some() {
            if produce {
                out.kv_pinned = self.pin_prefill(id, prompt_len);
            }
            self.end(id, Some(Ok(out)));
        } else if r.tx.send(Ok(out)).is_err() {
            self.end(id, None);
        }
    }

    fn publish(&self) {
        self.stats.publish(
            self.sched.num_running(),
            self.sched.num_waiting() + self.forks.values().map(Vec::len).sum::<usize>(),
            self.sched.kv().usage(),
            self.sched.kv().num_free(),
        );
        if self.lora.in_use() {
            let (running, waiting) = self.sched.loras();
            let names =
                |ids: Vec<u32>| ids.into_iter().filter_map(|id| self.lora.name(id).map(str::to_string)).collect();
            self.stats.publish_loras(names(running), names(waiting));
        }
        self.publish_pins();
    }
}
