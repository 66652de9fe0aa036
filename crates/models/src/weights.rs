//! The interface through which a model receives its weights.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::Result;

/// One weight as stored by its source: dense (already on the target device and dtype) or
/// quantized (kept quantized, used through `QMatMul`).
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Weight {
    /// The weight's shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quant(q) => q.shape().dims().to_vec(),
        }
    }

    /// The weight as a dense tensor of `dtype` (dequantizing if needed).
    pub fn dense(&self, dtype: candle_core::DType) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(dtype)?,
            Weight::Quant(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
        })
    }
}

/// A source of named weights, named in Hugging Face layout (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// Fetch a weight by its Hugging Face name. Missing weights are `ModelError::MissingWeight`.
    fn get(&self, name: &str) -> Result<Weight>;
    /// Whether the source has a weight of this name.
    fn contains(&self, name: &str) -> bool;

    /// Fetch a weight and check its shape against what the config implies.
    fn get_checked(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        let w = self.get(name)?;
        let got = w.dims();
        if got != expected {
            return Err(crate::ModelError::Shape { name: name.to_string(), got, expected: expected.to_vec() });
        }
        Ok(w)
    }
}
