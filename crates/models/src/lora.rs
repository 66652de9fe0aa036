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
    /// On the CPU: `A` (`[r, in]`) and `scale · Bᵀ` as f32, for the row kernel.
    cpu: Option<(Vec<f32>, Vec<f32>)>,
}

impl LoraPair {
    fn new(a: Tensor, bt: Tensor) -> Result<Self> {
        let cpu = match a.device().is_cpu() {
            true => Some((
                a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                bt.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            )),
            false => None,
        };
        Ok(Self { at: a.t()?.contiguous()?, bt, cpu })
    }

    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_dtype(self.at.dtype())?.matmul(&self.at)?.matmul(&self.bt)?)
    }

    fn width(&self) -> usize {
        self.bt.dims().get(1).copied().unwrap_or(0)
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
    pub(crate) fn get(&self, t: Target) -> Option<&LoraPair> {
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

/// llama.cpp's row order of a q/k projection (rotary pairs adjacent): for each output row of
/// the permuted matrix, the Hugging Face row it holds (heads of `head_dim`).
fn interleaved_rows(rows: usize, head_dim: usize) -> Vec<u32> {
    let half = head_dim / 2;
    (0..rows)
        .map(|n| {
            let (h, w) = (n / head_dim, n % head_dim);
            (h * head_dim + (w % 2) * half + w / 2) as u32
        })
        .collect()
}

impl LoraAdapter {
    /// Load `name` from `src` (Hugging Face names: `model.layers.N.self_attn.q_proj.lora_A.weight`)
    /// for `layers` (this stage's, global indices), each laid out as `layout(layer)` says.
    /// With `interleaved` (the head size, when the base keeps llama.cpp's q/k row order, as a
    /// llama GGUF does) the q/k factors' `B` rows, written in Hugging Face order by PEFT, are
    /// put in the same order.
    pub fn load(
        name: &str,
        config: LoraConfig,
        src: &dyn WeightSource,
        layers: std::ops::Range<usize>,
        layout: impl Fn(usize) -> TargetLayout,
        dtype: DType,
        interleaved: Option<usize>,
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
                let b = match interleaved.filter(|_| t == Target::Q as usize || t == Target::K as usize) {
                    None => src.get_shard(&b_name, &[o, r], b_shard)?.dense(dtype)?,
                    // Permuted whole, then sliced: shards hold whole heads, as the base's rows.
                    Some(hd) => {
                        let full = src.get_checked(&b_name, &[o, r])?.dense(dtype)?;
                        let order = Tensor::new(interleaved_rows(o, hd).as_slice(), full.device())?;
                        let (lo, hi) = b_shard.range(o);
                        full.index_select(&order, 0)?.narrow(0, lo, hi - lo)?
                    }
                };
                let bt = (b.t()?.to_dtype(DType::F32)? * scale)?.to_dtype(dtype)?.contiguous()?;
                layer.pairs[t] = Some(LoraPair::new(a.contiguous()?, bt)?);
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
    let interleaved = cfg.rope_interleaved.then_some(cfg.head_dim);
    LoraAdapter::load(name, config, src, 0..cfg.num_layers, layout, DType::F32, interleaved).map(|_| ())
}

/// The token rows of one adapter in a batch.
#[derive(Debug, Clone)]
pub struct LoraRows {
    pub adapter: Arc<LoraAdapter>,
    /// Indices into the batch's tokens.
    pub rows: Vec<u32>,
    /// `rows` on the model's device (u32).
    pub index: Tensor,
}

impl LoraRows {
    pub fn new(adapter: Arc<LoraAdapter>, rows: Vec<u32>, device: &candle_core::Device) -> Result<Self> {
        let index = Tensor::new(rows.as_slice(), device)?;
        Ok(Self { adapter, rows, index })
    }
}

/// `y` plus, for the rows of each adapter in `groups`, its deltas of `x` for `parts` of
/// layer `layer`: each `(target, column)` adds that projection's delta at columns
/// `column..` of `y` (several projections of one fused output: q/k/v, gate/up). `x` is the
/// projections' input, `y` their output. On the CPU one pass of the row kernel; elsewhere,
/// per adapter, two small matmuls over its rows and an indexed add.
pub fn add_lora(y: Tensor, x: &Tensor, groups: &[LoraRows], layer: usize, parts: &[(Target, usize)]) -> Result<Tensor> {
    let cpu = x.device().is_cpu()
        && groups.iter().all(|g| {
            g.adapter.layer(layer).is_none_or(|l| parts.iter().all(|&(t, _)| l.get(t).is_none_or(|p| p.cpu.is_some())))
        });
    match cpu {
        true => add_lora_cpu(y, x, groups, layer, parts),
        false => add_lora_generic(y, x, groups, layer, parts),
    }
}

fn add_lora_cpu(y: Tensor, x: &Tensor, groups: &[LoraRows], layer: usize, parts: &[(Target, usize)]) -> Result<Tensor> {
    let (rows, out) = y.dims2()?;
    let inp = x.dim(1)?;
    let mut group = vec![None; rows];
    let mut updates = Vec::with_capacity(groups.len());
    for rs in groups {
        let mut ups = vec![];
        if let Some(l) = rs.adapter.layer(layer) {
            for &(t, offset) in parts {
                if let Some(LoraPair { cpu: Some((a, bt)), .. }) = l.get(t) {
                    let rank = a.len() / inp.max(1);
                    ups.push(tessera_kernels::LoraUpdate { a, bt, rank, offset });
                }
            }
        }
        if !ups.is_empty() {
            for &r in &rs.rows {
                if let Some(slot) = group.get_mut(r as usize) {
                    *slot = Some(updates.len());
                }
            }
            updates.push(ups);
        }
    }
    if updates.is_empty() {
        return Ok(y);
    }
    let dtype = y.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mut yv: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    crate::layers::with_cpu_f32(&x, |xs| {
        tessera_kernels::lora_add(tessera_kernels::Isa::active(), xs, inp, &mut yv, out, &group, &updates)
            .map_err(crate::layers::kernel_err)
    })?;
    Ok(Tensor::from_vec(yv, (rows, out), x.device())?.to_dtype(dtype)?)
}

fn add_lora_generic(
    y: Tensor,
    x: &Tensor,
    groups: &[LoraRows],
    layer: usize,
    parts: &[(Target, usize)],
) -> Result<Tensor> {
    let out = y.dim(1)?;
    let mut y = y;
    for g in groups {
        let Some(l) = g.adapter.layer(layer) else { continue };
        let xs = x.index_select(&g.index, 0)?;
        for &(t, at) in parts {
            let Some(pair) = l.get(t) else { continue };
            let d = pair.delta(&xs)?.to_dtype(y.dtype())?;
            let (n, w) = (g.rows.len(), pair.width());
            let d = match (at, at + w == out) {
                (0, true) => d,
                _ => {
                    let (dt, dev) = (d.dtype(), d.device().clone());
                    let zeros = |c: usize| Tensor::zeros((n, c), dt, &dev);
                    Tensor::cat(&[zeros(at)?, d, zeros(out - at - w)?], 1)?
                }
            };
            y = y.index_add(&g.index, &d, 0)?;
        }
    }
    Ok(y)
}

/// Whether any adapter in `groups` adapts the MLP of layer `layer`.
pub fn adapts_mlp(groups: &[LoraRows], layer: usize) -> bool {
    groups.iter().any(|g| g.adapter.layer(layer).is_some_and(LayerLora::adapts_mlp))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;
    use crate::Weight;

    struct Map(HashMap<String, Tensor>);

    impl WeightSource for Map {
        fn get(&self, name: &str) -> Result<Weight> {
            self.0.get(name).cloned().map(Weight::Dense).ok_or_else(|| ModelError::MissingWeight(name.into()))
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
    }

    /// The row kernel (CPU) and the generic path (gathers, matmuls, indexed adds) give the same
    /// result for two adapters over some of a batch's rows, into a fused output at offsets.
    #[test]
    fn the_cpu_row_kernel_equals_the_generic_path() {
        let dev = Device::Cpu;
        let (inp, q, k, r) = (24, 16, 8, 4);
        let adapter = |name: &str| {
            let mut m = HashMap::new();
            for (t, out) in [("q_proj", q), ("k_proj", k)] {
                let p = format!("model.layers.0.self_attn.{t}");
                m.insert(format!("{p}.lora_A.weight"), Tensor::randn(0f32, 1.0, (r, inp), &dev).unwrap());
                m.insert(format!("{p}.lora_B.weight"), Tensor::randn(0f32, 1.0, (out, r), &dev).unwrap());
            }
            let layout = |_| -> TargetLayout {
                [Some(([q, inp], Shard::FULL)), Some(([k, inp], Shard::FULL)), None, None, None, None, None]
            };
            let cfg = LoraConfig { rank: r, alpha: 8.0, rslora: false };
            Arc::new(LoraAdapter::load(name, cfg, &Map(m), 0..1, layout, DType::F32, None).unwrap())
        };
        let groups = vec![
            LoraRows::new(adapter("a"), vec![0, 3], &dev).unwrap(),
            LoraRows::new(adapter("b"), vec![2], &dev).unwrap(),
        ];
        let x = Tensor::randn(0f32, 1.0, (5, inp), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (5, q + k), &dev).unwrap();
        let parts = [(Target::Q, 0), (Target::K, q)];
        let fast = add_lora_cpu(y.clone(), &x, &groups, 0, &parts).unwrap();
        let generic = add_lora_generic(y.clone(), &x, &groups, 0, &parts).unwrap();
        let d = (&fast - &generic).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "row kernel vs generic path: {d}");
        let moved = (&fast - &y).unwrap().abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(moved[1] == 0.0 && moved[4] == 0.0, "rows on no adapter are untouched: {moved:?}");
        assert!(moved[0] > 0.0 && moved[2] > 0.0 && moved[3] > 0.0, "{moved:?}");
    }

    /// llama.cpp's converter puts HF row `i·half + j` of each head at row `2j + i`.
    #[test]
    fn interleaved_rows_follow_llama_cpp_s_permutation() {
        assert_eq!(interleaved_rows(8, 4), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        let rows = interleaved_rows(12, 6);
        for h in 0..2 {
            for i in 0..2 {
                for j in 0..3 {
                    assert_eq!(rows[h * 6 + 2 * j + i] as usize, h * 6 + i * 3 + j);
                }
            }
        }
    }
}
