//! Live engine figures, written by the engine thread and read by `/metrics` and tests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tessera_protocol::FinishReason;
use tessera_runner::StepPlan;

use crate::kv::PrefixStats;

/// Gauges and counters of one engine. All fields are updated with relaxed atomics.
#[derive(Debug)]
pub struct EngineStats {
    pub num_blocks: usize,
    pub block_size: usize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub free_blocks: AtomicUsize,
    kv_usage_bits: AtomicU64,
    pub steps: AtomicU64,
    /// Steps that ran more than one sequence.
    pub batched_steps: AtomicU64,
    /// Largest number of sequences in one step so far.
    pub max_batch: AtomicUsize,
    pub preemptions: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub finished_abort: AtomicU64,
}

impl EngineStats {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            num_blocks,
            block_size,
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            free_blocks: AtomicUsize::new(num_blocks),
            kv_usage_bits: AtomicU64::new(0f64.to_bits()),
            steps: AtomicU64::new(0),
            batched_steps: AtomicU64::new(0),
            max_batch: AtomicUsize::new(0),
            preemptions: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            finished_stop: AtomicU64::new(0),
            finished_length: AtomicU64::new(0),
            finished_abort: AtomicU64::new(0),
        }
    }

    /// KV cache usage, 0..1.
    pub fn kv_usage(&self) -> f64 {
        f64::from_bits(self.kv_usage_bits.load(Ordering::Relaxed))
    }

    pub(crate) fn record_step(&self, plan: &StepPlan, preempted: usize) {
        let n = plan.seqs.len();
        self.steps.fetch_add(1, Ordering::Relaxed);
        if n > 1 {
            self.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.max_batch.fetch_max(n, Ordering::Relaxed);
        self.preemptions.fetch_add(preempted as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_finish(&self, r: FinishReason) {
        let c = match r {
            FinishReason::Stop => &self.finished_stop,
            FinishReason::Length => &self.finished_length,
            FinishReason::Abort => &self.finished_abort,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn publish(&self, running: usize, waiting: usize, usage: f64, free: usize, prefix: PrefixStats) {
        self.running.store(running, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        self.kv_usage_bits.store(usage.to_bits(), Ordering::Relaxed);
        self.free_blocks.store(free, Ordering::Relaxed);
        self.prefix_queries.store(prefix.queries, Ordering::Relaxed);
        self.prefix_hits.store(prefix.hits, Ordering::Relaxed);
    }
}
