//! Continuous batching: each step picks running sequences first (decode tokens and
//! unfinished prefill chunks), then admits waiting ones, under a token budget; blocks come
//! from the [`KvCacheManager`] and, when they run out, the most recently admitted running
//! sequence with the lowest priority is preempted (its blocks freed, recomputed later).
//! Waiting sequences are ordered by criticality class, then (with the priority policy) the
//! request's `priority`, then arrival; a waiting sequence of a strictly better class or
//! priority may preempt a running one to get in.

use std::collections::VecDeque;

use tessera_runner::{PromptLogprobs, SampleSpec, SamplingConfig, SeqStep, StepPlan, StepResult};

use crate::kv::transfer::RemoteSource;
use crate::kv::{CachedPrefix, KvCacheManager};

/// Scheduler limits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_chunked_prefill: bool,
    pub policy: Policy,
    /// Most distinct LoRA adapters among running sequences (`--max-loras`); a waiting
    /// sequence on another adapter waits, and those behind it on running adapters or the
    /// base go first.
    #[serde(default = "default_max_loras")]
    pub max_loras: usize,
}

fn default_max_loras() -> usize {
    1
}

/// `--scheduling-policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Policy {
    /// First come, first served (within a criticality class).
    #[default]
    Fcfs,
    /// The request's `priority` (lower first), then arrival.
    Priority,
}

/// Ordering key: (criticality class, priority, arrival); smaller runs first.
pub type SeqKey = (u8, i64, u64);

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys/values are in the cache.
    pub num_computed: usize,
    pub sampling: SamplingConfig,
    /// Criticality class (0 = most critical) and request priority (lower = sooner).
    pub class: u8,
    pub priority: i64,
    /// Another choice of the same request whose computed prompt blocks this one may share
    /// when it is admitted (a waiting sequence never holds blocks).
    pub fork_of: Option<u64>,
    /// Where this sequence's prompt KV was prefilled (a decode leg): pulled at admission.
    pub remote: Option<Box<RemoteSource>>,
    /// The LoRA adapter it runs on (also its prefix-cache namespace), or the base model.
    pub lora: Option<u32>,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, sampling: SamplingConfig) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            sampling,
            class: 1,
            priority: 0,
            fork_of: None,
            remote: None,
            lora: None,
        }
    }

    pub fn with_priority(mut self, class: u8, priority: i64) -> Self {
        self.class = class;
        self.priority = priority;
        self
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// What one call to [`Scheduler::schedule`] decided.
#[derive(Debug, Default)]
pub struct Scheduled {
    pub plan: StepPlan,
    /// Sequences preempted this step (moved back to waiting).
    pub preempted: Vec<u64>,
    /// (sequence, tokens found in the prefix cache) for sequences admitted this step with a hit.
    pub prefix_hits: Vec<(u64, usize)>,
    /// KV pulls to start: sequences admitted this step whose prompt was prefilled elsewhere.
    pub pulls: Vec<PullJob>,
}

/// Copy a prompt's prefilled blocks from a remote worker into local blocks.
#[derive(Debug, Clone)]
pub struct PullJob {
    pub seq_id: u64,
    /// Local blocks to fill, in order, with the remote blocks of the same index.
    pub local: Vec<u32>,
    pub remote: Vec<u32>,
    pub source: Box<RemoteSource>,
}

/// The adapters of `seqs`, each once, sorted.
fn lora_ids<'a>(seqs: impl Iterator<Item = &'a Sequence>) -> Vec<u32> {
    let mut v: Vec<u32> = seqs.filter_map(|s| s.lora).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Admitted sequences waiting for their prompt's KV to arrive from a prefill worker.
    pulling: Vec<Sequence>,
    /// (seq id, tokens scheduled) of the last plan, applied by [`Scheduler::apply`].
    in_flight: Vec<(u64, usize)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvCacheManager) -> Self {
        Self { cfg, kv, waiting: VecDeque::new(), running: Vec::new(), pulling: Vec::new(), in_flight: Vec::new() }
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Sequences not running yet: queued, or waiting for remote KV.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.pulling.len()
    }

    /// Sequences whose KV pull is under way.
    pub fn num_pulling(&self) -> usize {
        self.pulling.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn key(&self, s: &Sequence) -> SeqKey {
        let prio = if self.cfg.policy == Policy::Priority { s.priority } else { 0 };
        (s.class, prio, s.id)
    }

    pub fn add(&mut self, seq: Sequence) {
        let key = self.key(&seq);
        let at = self.waiting.iter().position(|w| self.key(w) > key).unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    /// Add `seq`, a further choice of `parent`'s prompt. When admitted it shares the parent's
    /// full prompt blocks if the parent still holds them (the tail of the prompt is
    /// recomputed, so at least one token is left to compute).
    pub fn add_fork(&mut self, mut seq: Sequence, parent: u64) {
        seq.fork_of = Some(parent);
        self.add(seq);
    }

    /// Blocks a sequence about to be admitted can start from: its fork parent's prompt blocks
    /// or the prefix cache, whichever covers more. The flag says whether they came from the cache.
    fn starting_blocks(&self, seq: &Sequence) -> (CachedPrefix, bool) {
        // Prompt log-probabilities need every prompt position computed: no shared prefix.
        if seq.num_computed > 0 || seq.sampling.prompt_logprobs.is_some() {
            return (CachedPrefix::default(), false);
        }
        let cached = self.kv.cached_prefix(&seq.tokens, seq.lora);
        let bs = self.kv.block_size();
        // Only blocks the parent has computed (it may be re-running after a preemption).
        let parent = seq.fork_of.and_then(|p| self.get(p)).map(|p| (p.id, p.num_computed / bs));
        let shareable = (seq.prompt_len.saturating_sub(1) / bs).min(parent.map_or(0, |p| p.1));
        match parent.map(|(p, _)| self.kv.prefix_of(p, shareable)) {
            Some(f) if f.blocks.len() > cached.blocks.len() => (f, false),
            _ => (cached, true),
        }
    }

    /// Read access to a live sequence.
    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running.iter().find(|s| s.id == id).or_else(|| self.waiting.iter().find(|s| s.id == id))
    }

    /// Remove a sequence (finished or cancelled) and free its blocks. A sequence whose pull
    /// is under way keeps its blocks pinned (the pull may still write them) until
    /// [`Scheduler::pull_done`].
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        if let Some(i) = self.pulling.iter().position(|s| s.id == id) {
            self.kv.pin(id);
            return Some(self.pulling.remove(i));
        }
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            self.waiting.iter().position(|s| s.id == id).and_then(|i| self.waiting.remove(i))
        };
        if seq.is_some() {
            self.kv.free(id);
        }
        seq
    }

    /// Take a finished running sequence out, keeping its blocks pinned under its id (the
    /// prefill leg's KV, until [`Scheduler::unpin`]). Returns the pinned block table.
    pub fn pin(&mut self, id: u64) -> Vec<u32> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i);
            return self.kv.pin(id);
        }
        Vec::new()
    }

    /// Free blocks pinned under `id`.
    pub fn unpin(&mut self, id: u64) {
        self.kv.unpin(id);
    }

    /// A pull has ended: with `ok`, every prompt token but the last is in the cache; otherwise
    /// the sequence computes its prompt itself. A sequence removed meanwhile has its blocks
    /// freed now. Returns whether the sequence is still live.
    pub fn pull_done(&mut self, id: u64, ok: bool) -> bool {
        let Some(i) = self.pulling.iter().position(|s| s.id == id) else {
            self.kv.unpin(id);
            return false;
        };
        let mut seq = self.pulling.remove(i);
        if ok {
            seq.num_computed = seq.prompt_len - 1;
        }
        self.running.push(seq);
        true
    }

    /// The pull a waiting sequence at the head needs, if it has a remote prefill that covers
    /// more than the `cached` local prefix blocks: the blocks of every prompt token but the last.
    fn pull_job(&self, seq: &Sequence, cached: usize) -> Option<(usize, usize)> {
        let src = seq.remote.as_ref()?;
        let n = (seq.prompt_len - 1).div_ceil(self.kv.block_size());
        (seq.num_computed == 0 && n > cached && src.block_ids.len() >= n).then_some((cached, n))
    }

    /// Index of the running sequence to preempt first: the worst key.
    fn worst_running(&self) -> Option<usize> {
        (0..self.running.len()).max_by_key(|&i| self.key(&self.running[i]))
    }

    fn preempt(&mut self, i: usize) -> u64 {
        let mut victim = self.running.remove(i);
        self.kv.free(victim.id);
        victim.num_computed = 0;
        let id = victim.id;
        self.add(victim);
        id
    }

    /// Make room for the waiting sequence at `at` (the first that may start: see
    /// [`Scheduler::next_admissible`]) by preempting a running sequence of a strictly worse class
    /// (or, with the priority policy, priority). Returns false when none qualifies. Never for
    /// a sequence that could not start anyway (a new adapter past `max_loras`): the victim
    /// would only be admitted again, and preempted again.
    fn preempt_for_head(
        &mut self,
        at: usize,
        out: &mut Scheduled,
        scheduled: &mut Vec<(u64, usize)>,
        budget: &mut usize,
    ) -> bool {
        let (Some(head), Some(w)) = (self.waiting.get(at), self.worst_running()) else {
            return false;
        };
        let (hk, wk) = (self.key(head), self.key(&self.running[w]));
        if (hk.0, hk.1) >= (wk.0, wk.1) {
            return false;
        }
        let id = self.preempt(w);
        if let Some(p) = scheduled.iter().position(|&(s, _)| s == id) {
            *budget += scheduled.remove(p).1;
        }
        out.preempted.push(id);
        true
    }

    fn step_for(&self, seq: &Sequence, num_new: usize) -> SeqStep {
        let end = seq.num_computed + num_new;
        SeqStep {
            seq_id: seq.id,
            tokens: seq.tokens[seq.num_computed..end].to_vec(),
            start_pos: seq.num_computed,
            block_table: self.kv.block_table(seq.id).to_vec(),
            sample: (end == seq.tokens.len()).then(|| SampleSpec {
                config: seq.sampling.clone(),
                output_index: seq.num_output() as u64,
                history: if seq.sampling.needs_history() { seq.tokens.clone() } else { Vec::new() },
                prompt_len: seq.prompt_len,
            }),
            // Row `i` predicts the token at `num_computed + i + 1`, while that is a prompt token.
            prompt_logprobs: seq.sampling.prompt_logprobs.filter(|_| seq.num_computed + 1 < seq.prompt_len).map(
                |top| PromptLogprobs {
                    top,
                    targets: seq.tokens[seq.num_computed + 1..(end + 1).min(seq.prompt_len)].to_vec(),
                },
            ),
            lora: seq.lora,
        }
    }

    /// The adapters of running (and pulling) sequences, and of waiting ones, each once.
    pub fn loras(&self) -> (Vec<u32>, Vec<u32>) {
        (self.running_loras(), lora_ids(self.waiting.iter()))
    }

    fn running_loras(&self) -> Vec<u32> {
        lora_ids(self.running.iter().chain(&self.pulling))
    }

    /// The first waiting sequence that may start under `max_loras`: on the base model or on
    /// an adapter already running, or on a new one while fewer than `max_loras` run.
    fn next_admissible(&self) -> Option<usize> {
        // The head on the base model (always so without LoRA) needs no look at the adapters.
        if self.waiting.front().is_some_and(|s| s.lora.is_none()) {
            return Some(0);
        }
        let running = self.running_loras();
        let room = running.len() < self.cfg.max_loras;
        self.waiting.iter().position(|s| s.lora.is_none_or(|id| room || running.contains(&id)))
    }

    /// Decide the next step.
    pub fn schedule(&mut self) -> Scheduled {
        // Best key first, so that the running phase only ever preempts sequences (at or after
        // the one that needs room) that are no better than every sequence already scheduled.
        let mut running = std::mem::take(&mut self.running);
        running.sort_by_key(|s| self.key(s));
        self.running = running;
        let mut out = Scheduled::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled: Vec<(u64, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let remaining = seq.tokens.len() - seq.num_computed;
            if remaining == 0 || (!self.cfg.enable_chunked_prefill && remaining > budget) {
                i += 1;
                continue;
            }
            let num_new = remaining.min(budget);
            let (id, want) = (seq.id, seq.num_computed + num_new);
            let mut ok = true;
            while !self.kv.allocate(id, want, &CachedPrefix::default()) {
                // Only sequences not yet scheduled this step (index >= i) are candidates.
                let victim = (i..self.running.len()).max_by_key(|&j| self.key(&self.running[j]));
                match victim.map(|j| self.preempt(j)) {
                    Some(v) => {
                        out.preempted.push(v);
                        if v == id {
                            ok = false;
                            break;
                        }
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                break;
            }
            scheduled.push((id, num_new));
            budget -= num_new;
            i += 1;
        }
        if out.preempted.is_empty() {
            while budget > 0 {
                let Some(at) = self.next_admissible() else {
                    break;
                };
                if self.running.len() + self.pulling.len() >= self.cfg.max_num_seqs {
                    if self.preempt_for_head(at, &mut out, &mut scheduled, &mut budget) {
                        continue;
                    }
                    break;
                }
                let seq = &self.waiting[at];
                let (prefix, from_cache) = self.starting_blocks(seq);
                let cached = prefix.blocks.len() * self.kv.block_size();
                let start = seq.num_computed.max(cached);
                let remaining = seq.tokens.len() - start;
                let pull = self.pull_job(seq, prefix.blocks.len());
                if pull.is_none() && !self.cfg.enable_chunked_prefill && remaining > budget {
                    break;
                }
                // A pulled prompt takes no compute now, only blocks for the whole prompt.
                let num_new = if pull.is_some() { 0 } else { remaining.min(budget) };
                let want = if pull.is_some() { seq.prompt_len } else { start + num_new };
                let (id, query) = (seq.id, seq.tokens.len());
                if !self.kv.allocate(id, want, &prefix) {
                    if self.preempt_for_head(at, &mut out, &mut scheduled, &mut budget) {
                        continue;
                    }
                    break;
                }
                if from_cache {
                    self.kv.record_prefix(query, cached);
                    if cached > 0 {
                        out.prefix_hits.push((id, cached));
                    }
                }
                let Some(mut seq) = self.waiting.remove(at) else {
                    break;
                };
                seq.num_computed = start;
                // The remote prefill is used once: a later preemption recomputes locally.
                let source = seq.remote.take();
                if let (Some((k, n)), Some(source)) = (pull, source) {
                    let local = self.kv.block_table(id)[k..n].to_vec();
                    out.pulls.push(PullJob { seq_id: id, local, remote: source.block_ids[k..n].to_vec(), source });
                    self.pulling.push(seq);
                    continue;
                }
                self.running.push(seq);
                scheduled.push((id, num_new));
                budget -= num_new;
            }
        }
        for &(id, n) in &scheduled {
            if let Some(seq) = self.running.iter().find(|s| s.id == id) {
                out.plan.seqs.push(self.step_for(seq, n));
            }
        }
        self.in_flight = scheduled;
        out
    }

    /// Apply the results of the last plan: advance computed counts, register full blocks in
    /// the prefix cache, append sampled tokens. Returns the results appended.
    pub fn apply(&mut self, results: &[StepResult]) -> Vec<StepResult> {
        let mut appended = Vec::with_capacity(results.len());
        for (id, n) in std::mem::take(&mut self.in_flight) {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == id) else {
                continue;
            };
            seq.num_computed += n;
            self.kv.cache_full_blocks(id, &seq.tokens, seq.num_computed, seq.lora);
            if let Some((r, t)) = results.iter().find(|r| r.seq_id == id).and_then(|r| Some((r, r.token?))) {
                seq.tokens.push(t);
                appended.push(r.clone());
            }
        }
        appended
    }
}

#[cfg(test)]
mod tests;
