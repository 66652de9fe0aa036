//! The physical paged KV cache: per layer, one key and one value tensor of
//! `[num_blocks * block_size, num_kv_heads, head_dim]`. Slot `b * block_size + i` is
//! position `i` of block `b`. Which block belongs to which sequence is decided by the
//! engine; this type only holds the memory.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Zeroed cache memory. On the CPU the pages are the allocator's zeroed ones, untouched
/// until a block is first written: the resident size grows with the tokens cached, not with
/// the budget (candle fills f16/bf16 zeros element by element, touching every page).
fn zeros(shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2;
    Ok(match (device.is_cpu(), dtype) {
        (true, DType::F16) => Tensor::from_vec(zeroed_u16::<half::f16>(n), shape, device)?,
        (true, DType::BF16) => Tensor::from_vec(zeroed_u16::<half::bf16>(n), shape, device)?,
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// A vector of `n` zero values of a 16-bit float type, from a zero-allocated `u16` vector.
fn zeroed_u16<T: Copy>(n: usize) -> Vec<T> {
    assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2);
    let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: `T` is f16 or bf16 (`repr(transparent)` over u16: same size and alignment,
    // and all-zero bits are the value 0.0); the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// Paged key/value memory for every layer of one model (one rank's share).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    /// Allocate zeroed cache memory.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slots = num_blocks * block_size;
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            let k = zeros((slots, num_kv_heads, head_dim), dtype, device)?;
            let v = zeros((slots, num_kv_heads, head_dim), dtype, device)?;
            layers.push((k, v));
        }
        Ok(Self { layers, block_size, num_blocks })
    }

    /// Bytes needed for one block across all layers (keys and values).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * dtype.size_in_bytes()
    }

    /// Key and value tensors of one layer.
    pub fn layer(&self, idx: usize) -> &(Tensor, Tensor) {
        &self.layers[idx]
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}
