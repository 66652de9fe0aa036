//! Live engine figures, written by the engine thread and read by `/metrics` and tests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tessera_protocol::FinishReason;
use tessera_runner::StepPlan;

use crate::kv::transfer::Fallback;
use crate::kv::PrefixStats;

/// A latency histogram in seconds (fixed bucket bounds, like vLLM's).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// (per-bucket counts incl. the +Inf bucket, sum, count)
    data: Mutex<(Vec<u64>, f64, u64)>,
}

/// A histogram's state: (upper bound, count in that bucket alone) ending with +Inf, sum, count.
pub type HistogramSnapshot = (Vec<(f64, u64)>, f64, u64);

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, data: Mutex::new((vec![0; bounds.len() + 1], 0.0, 0)) }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        if let Ok(mut d) = self.data.lock() {
            d.0[i] += 1;
            d.1 += v;
            d.2 += 1;
        }
    }

    /// The raw state (per-bucket counts, sum, count), to copy into another histogram.
    pub(crate) fn raw(&self) -> (Vec<u64>, f64, u64) {
        match self.data.lock() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the state with `raw` (from [`Histogram::raw`] of a histogram with the same bounds).
    pub(crate) fn restore(&self, raw: (Vec<u64>, f64, u64)) {
        if raw.0.len() == self.bounds.len() + 1 {
            if let Ok(mut d) = self.data.lock() {
                *d = raw;
            }
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let d = match self.data.lock() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
        (bounds.zip(d.0).collect(), d.1, d.2)
    }
}

/// vLLM's bucket bounds.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const TRANSFER_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const REQUEST_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0];

/// KV transfer figures of one engine (both sides).
#[derive(Debug)]
pub struct KvTransferStats {
    pub blocks_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub blocks_received: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Pull duration on the decode side, successful pulls.
    pub latency: Histogram,
    /// Blocks held for decode workers now.
    pub pinned_blocks: AtomicUsize,
    /// Pins freed because nobody pulled them in time.
    pub pins_expired: AtomicU64,
    /// Decode legs that computed their prompt themselves, by [`Fallback`] reason.
    fallbacks: [AtomicU64; 3],
}

impl Default for KvTransferStats {
    fn default() -> Self {
        Self {
            blocks_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            blocks_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            latency: Histogram::new(TRANSFER_BUCKETS),
            pinned_blocks: AtomicUsize::new(0),
            pins_expired: AtomicU64::new(0),
            fallbacks: Default::default(),
        }
    }
}

impl KvTransferStats {
    pub fn fallback(&self, why: Fallback) {
        self.fallbacks[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn fallbacks(&self, why: Fallback) -> u64 {
        self.fallbacks[why as usize].load(Ordering::Relaxed)
    }
}

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
    /// Arrival → first token.
    pub ttft: Histogram,
    /// Between consecutive tokens of a choice.
    pub itl: Histogram,
    /// Arrival → end (any reason).
    pub e2e: Histogram,
    /// Arrival → first scheduled.
    pub queue_time: Histogram,
    /// Prompt positions run through the model (a pulled prompt adds only its last token).
    pub prompt_tokens_computed: AtomicU64,
    /// Prefill/decode KV transfer.
    pub kv: KvTransferStats,
    /// Set when the executor can no longer run steps (a lost rank): the engine refuses work.
    failure: Mutex<Option<String>>,
    /// The path each fused kernel takes (op, `fused` or `reference`, reason), from the executor.
    pub kernel_paths: Mutex<Vec<(String, String, String)>>,
    /// Names of the LoRA adapters of running and of waiting sequences (`vllm:lora_requests_info`).
    pub loras: Mutex<(Vec<String>, Vec<String>)>,
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
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_BUCKETS),
            queue_time: Histogram::new(REQUEST_BUCKETS),
            prompt_tokens_computed: AtomicU64::new(0),
            kv: KvTransferStats::default(),
            failure: Mutex::new(None),
            kernel_paths: Mutex::new(vec![]),
            loras: Mutex::new((vec![], vec![])),
        }
    }

    /// Why the engine stopped serving, if it did.
    pub fn failure(&self) -> Option<String> {
        match self.failure.lock() {
            Ok(f) => f.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn set_failure(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
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

    pub(crate) fn record_finish(&self, r: FinishReason, e2e_seconds: f64) {
        self.e2e.observe(e2e_seconds);
        let c = match r {
            FinishReason::Stop => &self.finished_stop,
            FinishReason::Length => &self.finished_length,
            FinishReason::Abort => &self.finished_abort,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Prefix-cache counters, updated as soon as a step is scheduled (before any of its output
    /// reaches a client, so a scrape after a response always includes that request).
    pub(crate) fn record_prefix(&self, prefix: PrefixStats) {
        self.prefix_queries.store(prefix.queries, Ordering::Relaxed);
        self.prefix_hits.store(prefix.hits, Ordering::Relaxed);
    }

    pub(crate) fn publish_loras(&self, running: Vec<String>, waiting: Vec<String>) {
        if let Ok(mut l) = self.loras.lock() {
            *l = (running, waiting);
        }
    }

    /// Names of the adapters of running and of waiting sequences.
    pub fn loras(&self) -> (Vec<String>, Vec<String>) {
        self.loras.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(crate) fn publish(&self, running: usize, waiting: usize, usage: f64, free: usize) {
        self.running.store(running, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        self.kv_usage_bits.store(usage.to_bits(), Ordering::Relaxed);
        self.free_blocks.store(free, Ordering::Relaxed);
    }
}

/// Every figure of an [`EngineStats`], as sent by a data-parallel replica on another pod.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct StatsWire {
    gauges: [usize; 4],
    kv_usage: f64,
    counters: [u64; 10],
    histograms: [(Vec<u64>, f64, u64); 4],
    failure: Option<String>,
    /// Adapters of running and waiting requests.
    #[serde(default)]
    loras: (Vec<String>, Vec<String>),
}

impl EngineStats {
    /// Every counter, in wire order.
    fn counters(&self) -> [&AtomicU64; 10] {
        [
            &self.steps,
            &self.batched_steps,
            &self.preemptions,
            &self.prompt_tokens,
            &self.generation_tokens,
            &self.prefix_queries,
            &self.prefix_hits,
            &self.finished_stop,
            &self.finished_length,
            &self.finished_abort,
        ]
    }

    pub(crate) fn to_wire(&self) -> StatsWire {
        let r = Ordering::Relaxed;
        StatsWire {
            gauges: [self.running.load(r), self.waiting.load(r), self.free_blocks.load(r), self.max_batch.load(r)],
            kv_usage: self.kv_usage(),
            counters: self.counters().map(|c| c.load(r)),
            histograms: [self.ttft.raw(), self.itl.raw(), self.e2e.raw(), self.queue_time.raw()],
            failure: self.failure(),
            loras: self.loras(),
        }
    }

    /// Take over a remote replica's figures.
    pub(crate) fn absorb(&self, w: StatsWire) {
        let r = Ordering::Relaxed;
        let [running, waiting, free, max_batch] = w.gauges;
        self.publish(running, waiting, w.kv_usage, free);
        self.max_batch.store(max_batch, r);
        for (c, v) in self.counters().into_iter().zip(w.counters) {
            c.store(v, r);
        }
        let [ttft, itl, e2e, queue] = w.histograms;
        self.ttft.restore(ttft);
        self.itl.restore(itl);
        self.e2e.restore(e2e);
        self.queue_time.restore(queue);
        self.publish_loras(w.loras.0, w.loras.1);
        if let Some(why) = w.failure {
            self.set_failure(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        let (b, sum, n) = h.snapshot();
        assert_eq!(b, vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
        assert!((sum - 3.65).abs() < 1e-9);
        assert_eq!(n, 4);
    }

    /// A remote replica's figures arrive whole, its LoRA adapters included.
    #[test]
    fn figures_cross_the_wire_with_the_lora_adapters() {
        let a = EngineStats::new(8, 16);
        a.publish(3, 1, 0.5, 4);
        a.publish_loras(vec!["sql".into()], vec!["chat".into(), "sql".into()]);
        let b = EngineStats::new(8, 16);
        let wire: StatsWire = serde_json::from_str(&serde_json::to_string(&a.to_wire()).unwrap()).unwrap();
        b.absorb(wire);
        assert_eq!(b.loras(), (vec!["sql".to_string()], vec!["chat".to_string(), "sql".to_string()]));
        assert_eq!(b.running.load(Ordering::Relaxed), 3);
    }
}
