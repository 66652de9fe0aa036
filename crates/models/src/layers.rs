//! Shared layers: linear (dense or quantized, optional bias), RMSNorm, embedding and the
//! gated SwiGLU MLP.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use crate::{Result, Weight, WeightSource};

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
        let w = src.get_checked(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias { Some(src.get_checked(&format!("{prefix}.bias"), &[out])?.dense(dtype)?) } else { None };
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

/// Token embedding table `[vocab, hidden]` (kept dense for cheap row gathers).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn new(table: Tensor) -> Self {
        Self { table }
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.table.index_select(ids, 0)?)
    }
}

/// Gated MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl GatedMlp {
    pub fn load(src: &dyn WeightSource, prefix: &str, hidden: usize, inter: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(src, &format!("{prefix}.gate_proj"), inter, hidden, false, dtype)?,
            up: Linear::load(src, &format!("{prefix}.up_proj"), inter, hidden, false, dtype)?,
            down: Linear::load(src, &format!("{prefix}.down_proj"), hidden, inter, false, dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        let u = self.up.forward(x)?;
        self.down.forward(&(g * u)?)
    }
}
