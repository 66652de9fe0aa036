//! The interface through which a model receives its weights.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::{shard_byte_runs, Result, Shard};

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
    /// A block-exact quantized shard cut along `dim`. candle's CPU dot products of the
    /// 32-element types want an even block count per row, so a column shard with an odd
    /// count is kept dense (same values).
    pub fn from_quant_shard(q: QTensor, dim: usize) -> Result<Weight> {
        let blocks = q.shape().dims().last().copied().unwrap_or(0) / q.dtype().block_size();
        if dim == 1 && blocks % 2 == 1 {
            return Ok(Weight::Dense(q.dequantize(&q.device())?));
        }
        Ok(Weight::Quant(Arc::new(q)))
    }

    /// Rows `start..start + len` along `dim` (0 or 1 of a matrix), in storage of its own.
    /// A quantized weight is sliced block-exactly when the cut falls on quantization blocks
    /// (always for rows; for columns when `start` and `len` are multiples of the block size);
    /// otherwise it is dequantized, sliced and quantized again.
    pub fn narrow(self, dim: usize, start: usize, len: usize) -> Result<Weight> {
        Ok(match self {
            // Own storage: the slice must not keep the whole tensor alive.
            Weight::Dense(t) => Weight::Dense(t.narrow(dim, start, len)?.force_contiguous()?),
            Weight::Quant(q) => match slice_blocks(&q, dim, start, len)? {
                Some(exact) => Weight::from_quant_shard(exact, dim)?,
                None => {
                    let d = q.dequantize(&q.device())?.narrow(dim, start, len)?.force_contiguous()?;
                    match QTensor::quantize(&d, q.dtype()) {
                        Ok(nq) => Weight::Quant(Arc::new(nq)),
                        Err(_) => Weight::Dense(d),
                    }
                }
            },
        })
    }
}

/// Copy the quantization blocks of a row or column range of a 2-D quantized matrix, or `None`
/// when the range does not fall on block boundaries.
fn slice_blocks(q: &QTensor, dim: usize, start: usize, len: usize) -> Result<Option<QTensor>> {
    let dims = q.shape().dims().to_vec();
    let dt = q.dtype();
    let [rows, cols] = dims[..] else { return Ok(None) };
    let Some((runs, shape)) =
        shard_byte_runs([rows, cols], (dt.block_size(), dt.type_size()), dim, (start, start + len))
    else {
        return Ok(None);
    };
    let data = q.data()?;
    if runs.last().is_some_and(|r| r.end > data.len()) {
        return Ok(None);
    }
    let bytes: Vec<u8> = runs.into_iter().flat_map(|r| data[r].iter().copied()).collect();
    Ok(Some(candle_core::quantized::ggml_file::qtensor_from_ggml(dt, &bytes, shape.to_vec(), &q.device())?))
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
        self.get_shard_by_narrowing(name, full, shard)
    }

    /// [`WeightSource::get_shard`]'s default: the whole weight, then the slice.
    fn get_shard_by_narrowing(&self, name: &str, full: &[usize], shard: Shard) -> Result<Weight> {
        let w = self.get_checked(name, full)?;
        if shard.is_full() {
            return Ok(w);
        }
        let (a, b) = shard.range(full[shard.dim]);
        w.narrow(shard.dim, a, b - a)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device};

    use super::*;
    use crate::Linear;

    #[test]
    fn quantized_row_and_column_shards_reproduce_the_full_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 128), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
        let x = Tensor::randn(0f32, 1.0, (5, 128), &dev).unwrap();
        let full = Linear::from_weight(Weight::Quant(q.clone()), None).unwrap().forward(&x).unwrap();
        let mut sum = Tensor::zeros((5, 64), DType::F32, &dev).unwrap();
        for i in 0..2 {
            let part = Weight::Quant(q.clone()).narrow(1, i * 64, 64).unwrap();
            assert!(matches!(part, Weight::Quant(_)), "block-aligned: stays quantized");
            let xi = x.narrow(1, i * 64, 64).unwrap().contiguous().unwrap();
            sum = (sum + Linear::from_weight(part, None).unwrap().forward(&xi).unwrap()).unwrap();
        }
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&full, &sum) < 1e-4, "row-parallel: {}", diff(&full, &sum));
        let rows: Vec<Tensor> = (0..2)
            .map(|i| {
                let part = Weight::Quant(q.clone()).narrow(0, i * 32, 32).unwrap();
                Linear::from_weight(part, None).unwrap().forward(&x).unwrap()
            })
            .collect();
        assert_eq!(diff(&full, &Tensor::cat(&rows, 1).unwrap()), 0.0, "column-parallel is exact");
        // 3 blocks per shard: kept dense (candle's Q4_1 kernel needs an even count), same values.
        let odd = Weight::Quant(q.clone()).narrow(1, 0, 96).unwrap();
        assert!(matches!(odd, Weight::Dense(_)));
    }
}
