//! The llama family (Llama 2/3, Mistral, Qwen2, SmolLM) on the shared layers.
//! Stateless: the paged KV cache is passed to [`Llama::forward`].

use candle_core::{DType, Device, Tensor};

use crate::attention::{paged_attention, write_cache};
use crate::layers::{Embedding, GatedMlp};
use crate::{BatchInput, KvCache, Linear, ModelConfig, ModelError, Result, RmsNorm, Rotary, WeightSource};

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: GatedMlp,
}

/// A llama-family decoder.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Build from a weight source. `max_positions` sizes the rotary tables.
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed_w = src.get_checked("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let embed = Embedding::new(embed_w.dense(dtype)?);
        let lm_head = if !cfg.tie_word_embeddings && src.contains("lm_head.weight") {
            Linear::load(src, "lm_head", cfg.vocab_size, h, false, dtype)?
        } else {
            Linear::from_weight(embed_w, None)?
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let b = cfg.attention_bias;
            let attn = Attention {
                q: Linear::load(src, &format!("{p}.self_attn.q_proj"), cfg.num_heads * hd, h, b, dtype)?,
                k: Linear::load(src, &format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * hd, h, b, dtype)?,
                v: Linear::load(src, &format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * hd, h, b, dtype)?,
                o: Linear::load(src, &format!("{p}.self_attn.o_proj"), h, cfg.num_heads * hd, false, dtype)?,
            };
            blocks.push(Block {
                attn_norm: RmsNorm::load(src, &format!("{p}.input_layernorm.weight"), h, cfg.rms_norm_eps, dtype)?,
                attn,
                mlp_norm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    cfg.rms_norm_eps,
                    dtype,
                )?,
                mlp: GatedMlp::load(src, &format!("{p}.mlp"), h, cfg.intermediate_size, dtype)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::load(src, "model.norm.weight", h, cfg.rms_norm_eps, dtype)?,
            lm_head,
            rotary: Rotary::new(cfg, max_positions, dtype, device)?,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Run one batch: writes this step's keys/values into `cache` and returns the logits
    /// of the rows in `input.logits_indices`, `[S, vocab]` (f32).
    pub fn forward(&self, input: &BatchInput, cache: &KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let t = input.tokens.dim(0)?;
        if t == 0 {
            return Err(ModelError::Config("empty batch".into()));
        }
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (cos, sin) = self.rotary.tables_for(&input.positions)?;
        let write_index = input.attn.slot_mapping.reshape((t, 1, 1))?.broadcast_as((t, nkv, hd))?.contiguous()?;
        let mut x = self.embed.forward(&input.tokens)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.attn_norm.forward(&x)?;
            let q = b.attn.q.forward(&h)?.reshape((t, nh, hd))?;
            let k = b.attn.k.forward(&h)?.reshape((t, nkv, hd))?;
            let v = b.attn.v.forward(&h)?.reshape((t, nkv, hd))?;
            let q = self.rotary.apply(&q, &cos, &sin)?;
            let k = self.rotary.apply(&k, &cos, &sin)?;
            let (kc, vc) = cache.layer(i);
            write_cache(kc, vc, &k, &v, &write_index)?;
            let a = paged_attention(&q, kc, vc, &input.attn, nkv)?;
            x = (x + b.attn.o.forward(&a)?)?;
            let h = b.mlp_norm.forward(&x)?;
            x = (x + b.mlp.forward(&h)?)?;
        }
        let x = x.index_select(&input.logits_indices, 0)?;
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}
