//! Model definitions for Tessera, written once on shared layers.
//!
//! Owns: architecture configs ([`ModelConfig`]), the shared layers (linear, RMSNorm, rotary,
//! attention over a paged KV cache, gated MLP), the physical KV cache tensors' *shape*
//! ([`KvCache`]), and one file per architecture with a stateless forward pass.
//!
//! Must not touch: files, networks or environment variables (weights arrive through the
//! [`WeightSource`] trait, implemented by `tessera-loader`), scheduling decisions, or
//! sampling. The KV cache is always an argument of `forward`, never a field of a layer.

mod attention;
mod bert;
mod config;
mod error;
pub mod fused;
mod kv;
mod layers;
mod llama;
mod lora;
mod model;
mod moe;
mod parallel;
mod rotary;
mod weights;

pub use attention::{AttentionMetadata, SeqAttention};
pub use bert::{Bert, BertConfig, Pooling};
pub use config::{Activation, DecoderStyle, ModelConfig, MoeConfig, MoeLayout, RopeScaling};
pub use error::{ModelError, Result};
pub use kv::KvCache;
pub use layers::{with_cpu_f32, LayerNorm, Linear, RmsNorm};
pub use llama::Llama;
pub use lora::{check_lora, LoraAdapter, LoraConfig, LoraRows, TargetLayout, LORA_TARGETS};
pub use model::{load_model, supported_architectures, CausalLm, ParallelPlan};
pub use parallel::{part, shard_byte_runs, HeadLayout, PipelineParallel, Shard, TensorParallel};
pub use rotary::Rotary;
pub use tessera_parallel::Communicator;
pub use weights::{Weight, WeightSource};

/// One forward batch: a flat list of tokens from several sequences (prefill chunks and
/// decode tokens mixed), with per-sequence attention metadata.
#[derive(Debug, Clone)]
pub struct BatchInput {
    /// Token ids, shape `[T]`, u32.
    pub tokens: candle_core::Tensor,
    /// Absolute positions of each token, shape `[T]`, u32.
    pub positions: candle_core::Tensor,
    /// Attention metadata (cache slots, per-sequence spans).
    pub attn: AttentionMetadata,
    /// Row indices (into `[T]`) whose logits are wanted, shape `[S]`, u32.
    pub logits_indices: candle_core::Tensor,
    /// The token rows of each LoRA adapter in the batch (rows of no adapter run the base).
    pub lora: Vec<LoraRows>,
}
