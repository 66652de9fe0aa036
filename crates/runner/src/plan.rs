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
    /// 0 disables min-p filtering.
    pub min_p: f32,
    /// Seed of this sequence's random stream (the engine picks one when the request has none).
    pub seed: u64,
    /// Subtracted once from the logit of every token already generated (0 = off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every generated token (0 = off).
    pub frequency_penalty: f32,
    /// Divides positive / multiplies negative logits of prompt and generated tokens (1 = off).
    pub repetition_penalty: f32,
    /// Added to the logit of a token id.
    pub logit_bias: Vec<(u32, f32)>,
    /// Tokens that may not be sampled while fewer than `min_tokens` were generated.
    pub min_tokens: usize,
    pub stop_ids: Vec<u32>,
    /// Return the sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Return every prompt token's log-probability (given the tokens before it) and this
    /// many alternatives (vLLM's `prompt_logprobs`; `echo` with `logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// The sequence's structured-output matcher: its mask limits what may be sampled, and
    /// the sampling rank commits each sampled token to it (rank 0 only; not sent to others).
    pub grammar: Option<tessera_grammar::GrammarHandle>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            min_tokens: 0,
            stop_ids: vec![],
            logprobs: None,
            prompt_logprobs: None,
            grammar: None,
        }
    }
}

impl SamplingConfig {
    /// Whether sampling needs the sequence's tokens (penalties).
    pub fn needs_history(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// Present when a sequence samples a token at the end of this step.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSpec {
    pub config: SamplingConfig,
    /// How many tokens the sequence generated before this one; with the seed it fixes the
    /// random draw, so recomputation after preemption yields the same text.
    pub output_index: u64,
    /// Prompt then generated tokens, only when [`SamplingConfig::needs_history`].
    pub history: Vec<u32>,
    /// Length of the prompt part of `history`.
    pub prompt_len: usize,
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
    /// Log-probabilities wanted for the prompt tokens this chunk predicts.
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// The LoRA adapter this sequence runs on (an id of a [`LoraOp::Load`] of this or an
    /// earlier plan), or the base model.
    pub lora: Option<u32>,
}

/// A change to the adapters every rank holds, applied before the step's forward.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraOp {
    /// Load the PEFT adapter in `path` (a local directory every rank can read) as `id`.
    Load { id: u32, name: String, path: std::path::PathBuf },
    /// Drop adapter `id`.
    Unload(u32),
}

/// The prompt tokens a chunk's rows predict: row `i` (position `start_pos + i`) predicts
/// `targets[i]`, the prompt token at `start_pos + i + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    /// Alternatives to return per position.
    pub top: usize,
    pub targets: Vec<u32>,
}

/// Everything computed in one engine step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub seqs: Vec<SeqStep>,
    /// Adapters to load or drop before this step runs.
    pub lora_ops: Vec<LoraOp>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

pub use tessera_protocol::TokenLogprobs;

/// What one sequence got from a step: a sampled token, and/or the log-probabilities of the
/// prompt tokens its chunk predicts.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    pub seq_id: u64,
    /// The sampled token, when the sequence sampled this step.
    pub token: Option<u32>,
    pub logprobs: Option<TokenLogprobs>,
    /// One entry per [`PromptLogprobs::targets`] of the step.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}
