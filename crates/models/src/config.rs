//! Architecture configuration for the llama family (Llama 2/3, Mistral, Qwen2, SmolLM),
//! read from a Hugging Face `config.json` or filled in from GGUF metadata.

use serde::Deserialize;

use crate::{ModelError, Result};

/// Rotary scaling as written in `config.json`'s `rope_scaling`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// No scaling (some configs spell it out).
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// Shape and numerics of a llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Rotary pairs are adjacent dimensions (llama.cpp's GGUF layout for `llama`) instead of
    /// the two halves of each head (Hugging Face layout).
    pub rope_interleaved: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Mixture of experts: the sparse layers' MLP is `experts` gated MLPs, `top_k` chosen
    /// per token by a router (see [`ModelConfig::moe_at`] for which layers are sparse).
    pub moe: Option<MoeConfig>,
    /// What sets the decoder apart from the plain llama layout (Gemma 3's features).
    pub style: DecoderStyle,
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`), in f32.
    GeluTanh,
    /// The same as ggml computes it on the CPU for GGUF models (llama.cpp's arithmetic): the
    /// gate rounded to f16 and its GELU read from an f16 table.
    GeluTanhGgml,
}

/// Decoder features beyond the llama layout; all off for the llama family.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DecoderStyle {
    pub activation: Activation,
    /// Embeddings multiplied by `sqrt(hidden_size)`.
    pub scale_embeddings: bool,
    /// An RMSNorm on the attention output and on the MLP output before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`; the MLP's input norm is
    /// then `pre_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// RMSNorm weights stored as offsets from 1 (Hugging Face Gemma checkpoints; llama.cpp's
    /// converter adds the 1 into GGUF files).
    pub norm_offset: bool,
    /// Sliding-window attention: `(window, pattern)` — a layer attends to its last `window`
    /// positions unless its index + 1 is a multiple of `pattern` (a global layer).
    pub sliding_window: Option<(usize, usize)>,
    /// Rotary base of the sliding-window layers (no scaling); the global ones use `rope_theta`.
    pub rope_local_theta: Option<f64>,
    /// Attention scores scaled by `1/sqrt(this)` instead of `1/sqrt(head_dim)`.
    pub query_pre_attn_scalar: Option<f64>,
}
/// How a mixture-of-experts layer is laid out and routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Each expert's intermediate size (Mixtral: `intermediate_size`; Qwen 3 MoE:
    /// `moe_intermediate_size`).
    pub expert_inter: usize,
    /// Whether the top-k routing weights are renormalised to sum to 1 (Mixtral always;
    /// Qwen 3 MoE when `norm_topk_prob`).
    pub renormalize: bool,
    /// Weight names: Mixtral's `block_sparse_moe.experts.N.{w1,w3,w2}` or Qwen's
    /// `mlp.experts.N.{gate,up,down}_proj` (the router is `gate` under either prefix).
    pub layout: MoeLayout,
    /// Every `sparse_step`-th layer is sparse (Qwen's `decoder_sparse_step`; 1: all) ...
    pub sparse_step: usize,
    /// ... except these, which keep a dense MLP of `intermediate_size` (`mlp_only_layers`).
    pub dense_layers: Vec<usize>,
}

/// The checkpoint naming of a mixture-of-experts layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeLayout {
    Mixtral,
    Qwen,
}

impl MoeLayout {
    /// The layer's prefix under `model.layers.N` and the experts' (gate, up, down) names.
    pub fn names(self) -> (&'static str, [&'static str; 3]) {
        match self {
            MoeLayout::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            MoeLayout::Qwen => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    /// Qwen 3 MoE's spelling of `num_local_experts`, and its other MoE fields.
    num_experts: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    /// Gemma 3's.
    hidden_activation: Option<String>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    /// Per layer `sliding_attention` / `full_attention` (newer Gemma 3 configs).
    layer_types: Option<Vec<String>>,
}

/// Gemma 3's features from its `config.json` (defaults for a `gemma3_text` config).
fn style(raw: &RawConfig, architecture: &str) -> DecoderStyle {
    if architecture != "Gemma3ForCausalLM" {
        return DecoderStyle::default();
    }
    let pattern = match &raw.layer_types {
        // The first global layer's position fixes the period.
        Some(t) => t.iter().position(|l| l == "full_attention").map_or(0, |i| i + 1),
        None => raw.sliding_window_pattern.unwrap_or(6),
    };
    DecoderStyle {
        activation: match raw.hidden_activation.as_deref() {
            Some("silu") => Activation::Silu,
            _ => Activation::GeluTanh,
        },
        scale_embeddings: true,
        sandwich_norms: true,
        norm_offset: true,
        sliding_window: raw.sliding_window.map(|w| (w, pattern)),
        rope_local_theta: Some(raw.rope_local_base_freq.unwrap_or(10_000.0)),
        query_pre_attn_scalar: raw.query_pre_attn_scalar,
    }
}

/// The mixture of experts a `config.json` describes: Mixtral's `num_local_experts` or Qwen 3
/// MoE's `num_experts` (with `moe_intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`
/// and `mlp_only_layers`).
fn moe_config(raw: &RawConfig, architecture: &str) -> Option<MoeConfig> {
    let top_k = raw.num_experts_per_tok.unwrap_or(2);
    if architecture == "Qwen3MoeForCausalLM" {
        return Some(MoeConfig {
            experts: raw.num_experts?,
            top_k,
            expert_inter: raw.moe_intermediate_size.unwrap_or(raw.intermediate_size),
            renormalize: raw.norm_topk_prob.unwrap_or(false),
            layout: MoeLayout::Qwen,
            sparse_step: raw.decoder_sparse_step.unwrap_or(1),
            dense_layers: raw.mlp_only_layers.clone(),
        });
    }
    Some(MoeConfig {
        experts: raw.num_local_experts?,
        top_k,
        expert_inter: raw.intermediate_size,
        renormalize: true,
        layout: MoeLayout::Mixtral,
        sparse_step: 1,
        dense_layers: vec![],
    })
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let architecture = raw.architectures.first().cloned().unwrap_or_else(|| "LlamaForCausalLM".to_string());
        if !crate::model::supported_architectures().contains(&architecture.as_str()) {
            return Err(ModelError::Config(format!("config.json: {}", crate::model::unsupported(&architecture))));
        }
        let moe = moe_config(&raw, &architecture);
        let architecture_name = architecture.clone();
        let style = style(&raw, &architecture);
        let rope_scaling = match raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(mut v) => {
                // Older configs spell the tag `type`.
                if let Some(obj) = v.as_object_mut() {
                    if !obj.contains_key("rope_type") {
                        if let Some(t) = obj.remove("type") {
                            obj.insert("rope_type".into(), t);
                        }
                    }
                }
                Some(
                    serde_json::from_value(v)
                        .map_err(|e| ModelError::Config(format!("config.json: unsupported rope_scaling: {e}")))?,
                )
            }
        };
        let num_heads = raw.num_attention_heads;
        let cfg = Self {
            attention_bias: raw.attention_bias.unwrap_or(architecture == "Qwen2ForCausalLM"),
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / num_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(architecture_name == "Gemma3ForCausalLM"),
            rope_interleaved: false,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(x)) => vec![x],
                Some(OneOrMany::Many(v)) => v,
            },
            moe,
            style,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Query and key are RMS-normed per head before the rotary (Qwen 3, dense and MoE; Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.architecture.as_str(), "Qwen3ForCausalLM" | "Qwen3MoeForCausalLM" | "Gemma3ForCausalLM")
    }

    /// The attention window of layer `layer` (`None`: it sees the whole context).
    pub fn window_at(&self, layer: usize) -> Option<usize> {
        self.style
            .sliding_window
            .filter(|&(_, pattern)| pattern == 0 || !(layer + 1).is_multiple_of(pattern))
            .map(|w| w.0)
    }

    /// The mixture of experts of layer `layer`, or `None` when its MLP is dense.
    pub fn moe_at(&self, layer: usize) -> Option<&MoeConfig> {
        self.moe.as_ref().filter(|m| (layer + 1).is_multiple_of(m.sparse_step) && !m.dense_layers.contains(&layer))
    }

    /// Check internal consistency; the message names the offending fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("num_attention_heads, num_key_value_heads and num_hidden_layers must be > 0".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even and > 0", self.head_dim));
        }
        if let Some(m) = &self.moe {
            if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
                return bad(format!(
                    "num_experts_per_tok ({}) must be in 1..=num_local_experts ({})",
                    m.top_k, m.experts
                ));
            }
            if m.expert_inter == 0 || m.sparse_step == 0 {
                return bad("moe_intermediate_size and decoder_sparse_step must be > 0".into());
            }
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, hidden_size and intermediate_size must be > 0".into());
        }
        Ok(())
    }

    /// Serialize as a Hugging Face `config.json` (used when deriving an HF copy of a GGUF).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if let Some(e) = self.eos_token_ids.first() {
            v["eos_token_id"] = (*e).into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_scaling_and_defaults() {
        let cfg = ModelConfig::from_hf_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192},
            "eos_token_id":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(cfg.num_kv_heads, 2);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
        assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_gqa() {
        let e = ModelConfig::from_hf_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
        let e = ModelConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":12,"intermediate_size":16,
            "num_hidden_layers":2,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads (2)"), "{e}");
    }
}
