//! BERT-family encoders (`BertModel`: all-MiniLM, BGE, E5 …) for embeddings, on the shared
//! layers (`Linear`, `LayerNorm`). A batch of sequences runs padded to its longest, with the
//! padding masked out of attention and pooling; pooling (mean, CLS, max) and the final L2
//! normalisation are the sentence-transformers config's. No KV cache: an encoder sees each
//! sequence whole.

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::layers::LayerNorm;
use crate::{Linear, ModelError, Result, WeightSource};

/// `config.json` of a BERT checkpoint (the fields the forward pass needs).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Parse `config.json`; an architecture other than BERT's is an error naming it.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        let kind = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
        let arch = v["architectures"].as_array().and_then(|a| a.first()).and_then(|a| a.as_str()).unwrap_or("");
        if kind != "bert" && !arch.starts_with("Bert") {
            return Err(ModelError::Config(format!("not a BERT encoder (model_type `{kind}`, architecture `{arch}`)")));
        }
        let cfg: Self = serde_json::from_value(v).map_err(|e| ModelError::Config(e.to_string()))?;
        if cfg.hidden_act != "gelu" {
            return Err(ModelError::Config(format!("BERT activation `{}` (only gelu)", cfg.hidden_act)));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(ModelError::Config("hidden_size must divide into the attention heads".into()));
        }
        Ok(cfg)
    }
}

/// How token states become one vector (sentence-transformers' `1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder.
#[derive(Debug, Clone)]
pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

impl Bert {
    /// Load the weights (names with or without a `bert.` prefix).
    pub fn load(cfg: &BertConfig, src: &dyn WeightSource, dtype: DType, device: &Device) -> Result<Self> {
        let p = if src.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let h = cfg.hidden_size;
        let dense = |name: &str, shape: &[usize]| -> Result<Tensor> {
            src.get_checked(&format!("{p}{name}"), shape)?.dense(dtype)
        };
        let norm = |name: &str| LayerNorm::load(src, &format!("{p}{name}"), h, cfg.layer_norm_eps, dtype);
        let lin = |name: &str, out: usize, inp: usize| Linear::load(src, &format!("{p}{name}"), out, inp, true, dtype);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: lin(&format!("{l}.attention.self.query"), h, h)?,
                k: lin(&format!("{l}.attention.self.key"), h, h)?,
                v: lin(&format!("{l}.attention.self.value"), h, h)?,
                o: lin(&format!("{l}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{l}.attention.output.LayerNorm"))?,
                up: lin(&format!("{l}.intermediate.dense"), cfg.intermediate_size, h)?,
                down: lin(&format!("{l}.output.dense"), h, cfg.intermediate_size)?,
                out_norm: norm(&format!("{l}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            word: dense("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            position: dense("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?,
            token_type: dense("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// One vector per sequence of `batch` (token ids with their special tokens), pooled and,
    /// with `normalize`, of unit length.
    pub fn embed(&self, batch: &[Vec<u32>], pooling: Pooling, normalize: bool) -> Result<Vec<Vec<f32>>> {
        let (b, len) = (batch.len(), batch.iter().map(Vec::len).max().unwrap_or(0));
        if b == 0 {
            return Ok(vec![]);
        }
        if len == 0 || len > self.cfg.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "sequences of 1..={} tokens, got {len}",
                self.cfg.max_position_embeddings
            )));
        }
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let hd = h / heads;
        let dev = &self.device;
        let mut ids = Vec::with_capacity(b * len);
        let mut keep = Vec::with_capacity(b * len);
        for s in batch {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, len - s.len())));
            keep.extend((0..len).map(|i| if i < s.len() { 1f32 } else { 0f32 }));
        }
        let ids = Tensor::from_vec(ids, b * len, dev)?;
        let keep = Tensor::from_vec(keep, (b, len), dev)?;
        let dtype = self.word.dtype();
        let pos = self.position.narrow(0, 0, len)?;
        let x = self.word.index_select(&ids, 0)?.reshape((b, len, h))?;
        let x = x.broadcast_add(&pos)?.broadcast_add(&self.token_type.get(0)?)?;
        let mut x = self.emb_norm.forward(&x.reshape((b * len, h))?)?;
        // Padding keys get −∞ before the softmax: [b, 1, 1, len].
        let bias = ((keep.clone() - 1.0)? * 1e9)?.to_dtype(dtype)?.reshape((b, 1, 1, len))?;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, len, heads, hd))?.transpose(1, 2)?.contiguous()?) };
        for l in &self.layers {
            let (q, k, v) = (split(l.q.forward(&x)?)?, split(l.k.forward(&x)?)?, split(l.v.forward(&x)?)?);
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * len, h))?;
            let x1 = l.attn_norm.forward(&(l.o.forward(&a)? + &x)?)?;
            let up = l.up.forward(&x1)?.gelu_erf()?;
            x = l.out_norm.forward(&(l.down.forward(&up)? + &x1)?)?;
        }
        let x = x.reshape((b, len, h))?.to_dtype(DType::F32)?;
        let pooled = match pooling {
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = keep.unsqueeze(2)?;
                (x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?))?
            }
            Pooling::Max => {
                let low = ((keep.unsqueeze(2)? - 1.0)? * 1e9)?;
                x.broadcast_add(&low)?.max(1)?
            }
        };
        let pooled = if normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2()?)
    }
}
