//! The step plan: what the scheduler tells every rank to compute in one step. Plain data,
//! so it can be sent to other ranks as is.

/// Sampling settings for one sequence (already validated and defaulted).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// Seed of this sequence's random stream (the engine picks one when the request has none).
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

/// Present when a sequence samples a token at the end of this step.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSpec {
    pub config: SamplingConfig,
    /// How many tokens the sequence generated before this one; with the seed it fixes the
    /// random draw, so recomputation after preemption yields the same text.
    pub output_index: u64,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqStep {
    pub seq_id: u64,
    /// Tokens computed this step (a prefill chunk, or the last sampled token).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; positions `0..start_pos` are already in the cache.
    pub start_pos: usize,
    /// Cache blocks covering positions `0..start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    pub sample: Option<SampleSpec>,
}

/// Everything computed in one engine step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub seqs: Vec<SeqStep>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// A sampled token for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepResult {
    pub seq_id: u64,
    pub token: u32,
}
