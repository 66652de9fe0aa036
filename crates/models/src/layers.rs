//! Shared layers: linear (dense or quantized, optional bias), RMSNorm, embedding and the
//! gated SwiGLU MLP.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use crate::{Result, Shard, Weight, WeightSource};

/// `y = x Wᵀ (+ b)`; `W` is `[out, in]`, dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    w: QMatMul,
    b: Option<Tensor>,
}

impl Linear {
    pub fn from_weight(w: Weight, b: Option<Tensor>) -> Result<Self> {
        let w = match w {
            Weight::Dense(t) => QMatMul::Tensor(t),
            Weight::Quant(q) => QMatMul::from_arc(q)?,
        };
        Ok(Self { w, b })
    }

    /// Load `{prefix}.weight` of shape `[out, in]` and, if `bias`, `{prefix}.bias`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_shard(src, prefix, out, inp, bias, dtype, Shard::FULL)
    }

    /// Load one rank's part of `{prefix}.weight` (full shape `[out, in]`): `shard.dim` 0 is
    /// column-parallel (a slice of the outputs, with its slice of the bias), 1 is row-parallel
    /// (a slice of the inputs; the bias is kept by part 0 only, so the sum over ranks adds it once).
    #[allow(clippy::too_many_arguments)]
    pub fn load_shard(
        src: &dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        dtype: DType,
        shard: Shard,
    ) -> Result<Self> {
        let w = src.get_shard(&format!("{prefix}.weight"), &[out, inp], shard)?;
        let b = match (bias, shard.dim) {
            (false, _) => None,
            (true, 0) => Some(src.get_shard(&format!("{prefix}.bias"), &[out], shard)?.dense(dtype)?),
            (true, _) if shard.index == 0 => Some(src.get_checked(&format!("{prefix}.bias"), &[out])?.dense(dtype)?),
            (true, _) => None,
        };
        Self::from_weight(w, b)
    }

    /// Apply to `x` of shape `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(src: &dyn WeightSource, name: &str, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        let w = src.get_checked(name, &[dim])?.dense(dtype)?;
        Ok(Self { w, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.w, self.eps)?)
    }
}

/// Token embedding table `[vocab, hidden]` (kept dense for cheap row gathers), or one
/// rank's rows `start..start + rows` of it (vocabulary-parallel).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
    start: usize,
    full: bool,
}

impl Embedding {
    pub fn new(table: Tensor) -> Self {
        Self { table, start: 0, full: true }
    }

    /// Rows `start..` of the vocabulary; [`Embedding::forward`] then gives zero rows for ids
    /// held by other ranks, and the sum over ranks is the full lookup.
    pub fn shard(table: Tensor, start: usize) -> Self {
        Self { table, start, full: false }
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if self.full {
            return Ok(self.table.index_select(ids, 0)?);
        }
        let rows = self.table.dim(0)?;
        let (lo, hi) = (self.start as u32, (self.start + rows) as u32);
        let ids: Vec<u32> = ids.to_vec1()?;
        let local: Vec<u32> = ids.iter().map(|&i| if (lo..hi).contains(&i) { i - lo } else { 0 }).collect();
        let mask: Vec<f32> = ids.iter().map(|&i| if (lo..hi).contains(&i) { 1.0 } else { 0.0 }).collect();
        let dev = self.table.device();
        let local = Tensor::from_vec(local, ids.len(), dev)?;
        let mask = Tensor::from_vec(mask, (ids.len(), 1), dev)?.to_dtype(self.table.dtype())?;
        Ok(self.table.index_select(&local, 0)?.broadcast_mul(&mask)?)
    }
}

/// Gated MLP: `down(silu(gate(x)) * up(x))`. Sharded, each rank holds a slice of the
/// intermediate dimension and returns a partial sum (the caller all-reduces).
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl GatedMlp {
    /// Part `index` of `count` of the intermediate dimension (`count` 1: the whole MLP).
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        hidden: usize,
        inter: usize,
        dtype: DType,
        index: usize,
        count: usize,
    ) -> Result<Self> {
        Self::load_named(src, prefix, ["gate_proj", "up_proj", "down_proj"], hidden, inter, dtype, index, count)
    }

    /// [`GatedMlp::load`] with the projections' names (`w1`, `w3`, `w2` for Mixtral experts).
    #[allow(clippy::too_many_arguments)]
    pub fn load_named(
        src: &dyn WeightSource,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        inter: usize,
        dtype: DType,
        index: usize,
        count: usize,
    ) -> Result<Self> {
        let (col, row) = (Shard::new(0, index, count), Shard::new(1, index, count));
        Ok(Self {
            gate: Linear::load_shard(src, &format!("{prefix}.{gate}"), inter, hidden, false, dtype, col)?,
            up: Linear::load_shard(src, &format!("{prefix}.{up}"), inter, hidden, false, dtype, col)?,
            down: Linear::load_shard(src, &format!("{prefix}.{down}"), hidden, inter, false, dtype, row)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        let u = self.up.forward(x)?;
        self.down.forward(&(g * u)?)
    }
}
