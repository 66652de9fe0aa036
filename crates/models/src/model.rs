//! The model seam: [`CausalLm`], the one interface the runner, the ranks and the loader use,
//! and the registry that builds an architecture from its checkpoint's name (`config.json`'s
//! `architectures`; the loader maps GGUF's `general.architecture` onto the same names). An
//! unknown architecture is an error listing the supported ones.

use candle_core::{DType, Device, Tensor};

use crate::fused::KernelReport;
use crate::{
    BatchInput, KvCache, Llama, LoraAdapter, LoraConfig, ModelConfig, ModelError, PipelineParallel, Result,
    TensorParallel, WeightSource,
};

/// This rank's share of an architecture's parallel plan, as built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelPlan {
    /// (rank, size) of the tensor-parallel group.
    pub tensor: (usize, usize),
    /// (stage, stages) of the pipeline.
    pub stage: (usize, usize),
    /// The model's layers this stage holds.
    pub layers: std::ops::Range<usize>,
    /// Query and key/value heads held here, of the model's.
    pub heads: (usize, usize),
    pub kv_heads: (usize, usize),
    /// Whether this rank's key/value heads are copies held by other ranks too (fewer KV heads
    /// than tensor ranks).
    pub kv_replicated: bool,
    /// Experts held here, of the model's, and whether whole experts are split over the group
    /// (expert parallelism) rather than each sliced; `None` without experts.
    pub experts: Option<(usize, usize, bool)>,
}

impl std::fmt::Display for ParallelPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tensor rank {} of {}, stage {} of {} (layers {}..{}), {} of {} heads, {} of {} KV heads{}",
            self.tensor.0,
            self.tensor.1,
            self.stage.0,
            self.stage.1,
            self.layers.start,
            self.layers.end,
            self.heads.0,
            self.heads.1,
            self.kv_heads.0,
            self.kv_heads.1,
            if self.kv_replicated { " (replicated)" } else { "" }
        )?;
        match self.experts {
            Some((held, total, true)) => write!(f, ", {held} of {total} experts whole"),
            Some((_, total, false)) => write!(f, ", all {total} experts sliced"),
            None => Ok(()),
        }
    }
}

/// A decoder served for generation: a stateless forward over the paged KV cache (passed in,
/// never held), its head layout and its share of the parallel plan.
pub trait CausalLm: Send + Sync + std::fmt::Debug {
    /// One batch: writes this step's keys/values into `cache` and returns the logits of the
    /// rows in `input.logits_indices`, `[S, vocab]` (f32).
    fn forward(&self, input: &BatchInput, cache: &KvCache) -> Result<Tensor>;
    /// This pipeline stage's part of the forward (the last stage returns its logits).
    fn forward_stage(&self, input: &BatchInput, cache: &KvCache) -> Result<Option<Tensor>>;
    /// Deliver micro-batches' logits to world rank 0 (see [`Llama::route_logits`]).
    fn route_logits(&self, parts: Vec<Option<Tensor>>) -> Result<Tensor>;
    /// Serve this rank's experts to other replicas' step, with no tokens of its own.
    fn idle_expert_pass(&self) -> Result<()>;
    fn pipeline_stages(&self) -> usize;
    /// Layers held (and cached) by this rank's pipeline stage.
    fn num_local_layers(&self) -> usize;
    /// Key/value heads held by this rank (its KV cache is sized for these).
    fn local_kv_heads(&self) -> usize;
    fn tensor_parallel(&self) -> &TensorParallel;
    fn config(&self) -> &ModelConfig;
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
    /// What the start-up check decided for each fused kernel.
    fn kernel_reports(&self) -> &[KernelReport];
    /// Check the fused kernels for a cache of `cache_dtype` in blocks of `block_size` (a
    /// collective over the tensor-parallel group).
    fn check_kernels(&mut self, cache_dtype: DType, block_size: usize) -> Result<()>;
    /// The (activation, cache) dtypes and block size of the last check.
    fn kernels_checked(&self) -> Option<(DType, DType, usize)>;
    /// This rank's share of a LoRA adapter read from `src` (Hugging Face names), sliced
    /// the way the architecture's parallel plan slices each adapted projection.
    fn load_lora(&self, name: &str, config: LoraConfig, src: &dyn WeightSource) -> Result<LoraAdapter>;
    /// What this rank holds of the model (the plan it was built with).
    fn parallel_plan(&self) -> ParallelPlan;
}

impl CausalLm for Llama {
    fn forward(&self, input: &BatchInput, cache: &KvCache) -> Result<Tensor> {
        Llama::forward(self, input, cache)
    }
    fn forward_stage(&self, input: &BatchInput, cache: &KvCache) -> Result<Option<Tensor>> {
        Llama::forward_stage(self, input, cache)
    }
    fn route_logits(&self, parts: Vec<Option<Tensor>>) -> Result<Tensor> {
        Llama::route_logits(self, parts)
    }
    fn idle_expert_pass(&self) -> Result<()> {
        Llama::idle_expert_pass(self)
    }
    fn pipeline_stages(&self) -> usize {
        Llama::pipeline_stages(self)
    }
    fn num_local_layers(&self) -> usize {
        Llama::num_local_layers(self)
    }
    fn local_kv_heads(&self) -> usize {
        Llama::local_kv_heads(self)
    }
    fn tensor_parallel(&self) -> &TensorParallel {
        Llama::tensor_parallel(self)
    }
    fn config(&self) -> &ModelConfig {
        Llama::config(self)
    }
    fn dtype(&self) -> DType {
        Llama::dtype(self)
    }
    fn device(&self) -> &Device {
        Llama::device(self)
    }
    fn kernel_reports(&self) -> &[KernelReport] {
        Llama::kernel_reports(self)
    }
    fn check_kernels(&mut self, cache_dtype: DType, block_size: usize) -> Result<()> {
        Llama::check_kernels(self, cache_dtype, block_size)
    }
    fn kernels_checked(&self) -> Option<(DType, DType, usize)> {
        Llama::kernels_checked(self)
    }
    fn load_lora(&self, name: &str, config: LoraConfig, src: &dyn WeightSource) -> Result<LoraAdapter> {
        Llama::load_lora(self, name, config, src)
    }
    fn parallel_plan(&self) -> ParallelPlan {
        Llama::parallel_plan(self)
    }
}

/// Builds one rank's share of an architecture.
type Build = fn(
    &ModelConfig,
    &dyn WeightSource,
    usize,
    DType,
    &Device,
    TensorParallel,
    PipelineParallel,
) -> Result<Box<dyn CausalLm>>;

fn llama(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    max_positions: usize,
    dtype: DType,
    device: &Device,
    tp: TensorParallel,
    pp: PipelineParallel,
) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Llama::load_pipelined(cfg, src, max_positions, dtype, device, tp, pp)?))
}

/// Architecture name → builder. The llama family (Llama 2/3, Mistral, Qwen2, Mixtral's MoE,
/// SmolLM) shares one implementation.
const REGISTRY: &[(&str, Build)] = &[
    ("LlamaForCausalLM", llama),
    ("MistralForCausalLM", llama),
    ("Qwen2ForCausalLM", llama),
    ("MixtralForCausalLM", llama),
    // Qwen 3: the llama layers plus per-head query/key RMSNorm, no qkv bias; its MoE routes
    // over `mlp.experts.N` with an optional renormalisation.
    ("Qwen3ForCausalLM", llama),
    ("Qwen3MoeForCausalLM", llama),
    // Gemma 3 (text): the same layers in its DecoderStyle.
    ("Gemma3ForCausalLM", llama),
];

/// The architectures this build serves.
pub fn supported_architectures() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// The error for an architecture nothing here builds.
pub(crate) fn unsupported(architecture: &str) -> ModelError {
    ModelError::Config(format!(
        "unsupported architecture `{architecture}` (supported: {})",
        supported_architectures().join(", ")
    ))
}

/// Build this rank's share of `cfg.architecture`: its pipeline stage's layers, sliced for its
/// tensor rank.
pub fn load_model(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    max_positions: usize,
    dtype: DType,
    device: &Device,
    tp: TensorParallel,
    pp: PipelineParallel,
) -> Result<Box<dyn CausalLm>> {
    let build = REGISTRY
        .iter()
        .find(|(name, _)| *name == cfg.architecture)
        .map(|(_, b)| *b)
        .ok_or_else(|| unsupported(&cfg.architecture))?;
    build(cfg, src, max_positions, dtype, device, tp, pp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_architecture_lists_the_supported_ones() {
        let e = unsupported("GPT2LMHeadModel").to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM") && e.contains("Qwen2ForCausalLM"),
            "{e}"
        );
        let e = ModelConfig::from_hf_json(
            r#"{"architectures":["Gemma9ForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Gemma9ForCausalLM") && e.contains("MixtralForCausalLM"), "{e}");
    }
}
