//! LoRA adapters, applied per sequence without merging weights (vLLM's multi-LoRA): a batch
//! may mix sequences on different adapters and on the base model. Each adapted projection
//! `y = x Wᵀ` gains `scale · (x Aᵀ) Bᵀ` for the rows of its adapter's sequences — one pair of
//! small matmuls per adapter in the batch over just its rows (a grouped LoRA matmul).
//!
//! Under tensor parallelism an adapter shards like the projection it adapts: for a
//! column-parallel projection (q, k, v, gate, up) each rank holds `B`'s rows of its outputs
//! and all of `A`; for a row-parallel one (o, down) each rank holds `A`'s columns of its
//! inputs and all of `B`, so the rank's delta is a partial sum completed by the projection's
//! all-reduce. A pipeline stage holds its layers only.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::{ModelConfig, ModelError, Result, Shard, WeightSource};

/// The projections an adapter may target, by their Hugging Face names.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// An adapter's `adapter_config.json`, as far as serving needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`.
    pub rank: usize,
    pub alpha: f64,
    /// rsLoRA scales by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraConfig {
    /// The factor of `B·A`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// One adapted projection: `x · at · bt`, the scale folded into `bt`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `Aᵀ`, `[in (this rank's), r]`.
    at: Tensor,
    /// `scale · Bᵀ`, `[r, out (this rank's)]`.
    bt: Tensor,
}

impl LoraPair {
    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.at.dtype())?.matmul(&self.at)?.matmul(&self.bt)?)
    }
}

/// A layer's adapted projections, indexed like [`LORA_TARGETS`].
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    pairs: [Option<LoraPair>; 7],
}

/// Which projection of a layer (an index into [`LORA_TARGETS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Q = 0,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LayerLora {
    fn get(&self, t: Target) -> Option<&LoraPair> {
        self.pairs[t as usize].as_ref()
    }

    /// Whether any MLP projection is adapted.
    pub fn adapts_mlp(&self) -> bool {
        [Target::Gate, Target::Up, Target::Down].iter().any(|&t| self.get(t).is_some())
    }
}

/// A loaded adapter: this rank's share of every layer of its pipeline stage.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub config: LoraConfig,
    layers: Vec<LayerLora>,
}

/// How one layer's targets are laid out on this rank: the full `[out, in]` of each
/// projection and the shard its base weight uses (`None`: not adaptable in this layer, e.g.
/// the MLP of a mixture-of-experts layer).
pub type TargetLayout = [Option<([usize; 2], Shard)>; 7];

impl LoraAdapter {
    /// Load `name` from `src` (Hugging Face names: `model.layers.N.self_attn.q_proj.lora_A.weight`)
    /// for `layers` (this stage's, global indices), each laid out as `layout(layer)` says.
    pub fn load(
        name: &str,
        config: LoraConfig,
        src: &dyn WeightSource,
        layers: std::ops::Range<usize>,
        layout: impl Fn(usize) -> TargetLayout,
        dtype: DType,
    ) -> Result<Self> {
        let r = config.rank;
        let scale = config.scale();
        let mut out = Vec::with_capacity(layers.len());
        for i in layers {
            let mut layer = LayerLora::default();
            for (t, place) in layout(i).iter().enumerate() {
                let module = if t < 4 { "self_attn" } else { "mlp" };
                let p = format!("model.layers.{i}.{module}.{}", LORA_TARGETS[t]);
                let (a_name, b_name) = (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight"));
                if !src.contains(&a_name) && !src.contains(&b_name) {
                    continue;
                }
                let Some(([o, inp], shard)) = *place else {
                    return Err(ModelError::Config(format!(
                        "LoRA adapter `{name}` adapts {p}, which this model cannot adapt (a mixture-of-experts MLP)"
                    )));
                };
                let (a_shard, b_shard) = match shard.dim {
                    0 => (Shard::FULL, shard),
                    _ => (shard, Shard::FULL),
                };
                let a = src.get_shard(&a_name, &[r, inp], a_shard)?.dense(dtype)?;
                let b = src.get_shard(&b_name, &[o, r], b_shard)?.dense(dtype)?;
                layer.pairs[t] = Some(LoraPair {
                    at: a.t()?.contiguous()?,
                    bt: (b.t()?.to_dtype(DType::F32)? * scale)?.to_dtype(dtype)?.contiguous()?,
                });
            }
            out.push(layer);
        }
        if out.iter().all(|l| l.pairs.iter().all(Option::is_none)) {
            return Err(ModelError::Config(format!(
                "LoRA adapter `{name}` adapts none of this model's projections ({})",
                LORA_TARGETS.join(", ")
            )));
        }
        Ok(Self { name: name.to_string(), config, layers: out })
    }

    /// The adapter's share of this stage's layer `i` (local index).
    pub fn layer(&self, i: usize) -> Option<&LayerLora> {
        self.layers.get(i)
    }
}

/// Where a llama-family layer's targets sit: full shapes, and the shards of the base weights
/// (`col`: q, gate, up; `kv`: k, v; `row`: o, down). The MLP of a mixture-of-experts layer
/// cannot be adapted.
pub(crate) fn llama_layout(
    cfg: &ModelConfig,
    col: Shard,
    row: Shard,
    kv: Shard,
) -> impl Fn(usize) -> TargetLayout + '_ {
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (nq, nkv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    move |i: usize| {
        let dense = cfg.moe_at(i).is_none();
        let mlp = |shape: [usize; 2], shard: Shard| dense.then_some((shape, shard));
        [
            Some(([nq, h], col)),
            Some(([nkv, h], kv)),
            Some(([nkv, h], kv)),
            Some(([h, nq], row)),
            mlp([inter, h], col),
            mlp([inter, h], col),
            mlp([h, inter], row),
        ]
    }
}

/// Check that an adapter fits `cfg` (its factors' shapes, its targets) by loading it whole
/// once, as f32 on the CPU where `src` keeps it.
pub fn check_lora(name: &str, cfg: &ModelConfig, config: LoraConfig, src: &dyn WeightSource) -> Result<()> {
    if !crate::model::supported_architectures().contains(&cfg.architecture.as_str()) {
        return Err(crate::model::unsupported(&cfg.architecture));
    }
    let layout = llama_layout(cfg, Shard::FULL, Shard::FULL, Shard::FULL);
    LoraAdapter::load(name, config, src, 0..cfg.num_layers, layout, DType::F32).map(|_| ())
}

/// The token rows of one adapter in a batch (`rows`: u32 indices into the batch's tokens).
#[derive(Debug, Clone)]
pub struct LoraRows {
    pub adapter: Arc<LoraAdapter>,
    pub rows: Tensor,
}

/// `y` plus, for the rows of each adapter in `groups` that adapts `target` of layer `layer`,
/// that adapter's delta of `x` (`x` the projection's input, `y` its output).
pub fn add_lora(y: Tensor, x: &Tensor, groups: &[LoraRows], layer: usize, target: Target) -> Result<Tensor> {
    let mut y = y;
    for g in groups {
        let Some(pair) = g.adapter.layer(layer).and_then(|l| l.get(target)) else { continue };
        let d = pair.delta(&x.index_select(&g.rows, 0)?)?.to_dtype(y.dtype())?;
        y = y.index_add(&g.rows, &d, 0)?;
    }
    Ok(y)
}

/// Whether any adapter in `groups` adapts the MLP of layer `layer`.
pub fn adapts_mlp(groups: &[LoraRows], layer: usize) -> bool {
    groups.iter().any(|g| g.adapter.layer(layer).is_some_and(LayerLora::adapts_mlp))
}
