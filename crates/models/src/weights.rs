//! The interface through which a model receives its weights.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::{Result, Shard};

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

impl Weight {
    /// Rows `start..start + len` along `dim`. A quantized weight is dequantized, sliced and
    /// quantized again to its type (kept dense if the slice breaks the quantization blocks).
    pub fn narrow(self, dim: usize, start: usize, len: usize) -> Result<Weight> {
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(t.narrow(dim, start, len)?.contiguous()?),
            Weight::Quant(q) => {
                let d = q.dequantize(&q.device())?.narrow(dim, start, len)?.contiguous()?;
                match QTensor::quantize(&d, q.dtype()) {
                    Ok(nq) => Weight::Quant(Arc::new(nq)),
                    Err(_) => Weight::Dense(d),
                }
            }
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

    /// Fetch one rank's part of a weight whose full shape is `full`. The default fetches the
    /// whole weight and slices it; sources that can read only the part override this.
    fn get_shard(&self, name: &str, full: &[usize], shard: Shard) -> Result<Weight> {
        let w = self.get_checked(name, full)?;
        if shard.is_full() {
            return Ok(w);
        }
        let (a, b) = shard.range(full[shard.dim]);
        w.narrow(shard.dim, a, b - a)
    }
}
