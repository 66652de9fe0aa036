//! The physical paged KV cache: per layer, one key and one value tensor of
//! `[num_blocks * block_size, num_kv_heads, head_dim]`. Slot `b * block_size + i` is
//! position `i` of block `b`. Which block belongs to which sequence is decided by the
//! engine; this type only holds the memory.

use candle_core::{DType, Device, Tensor};

use crate::Result;

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
            let k = Tensor::zeros((slots, num_kv_heads, head_dim), dtype, device)?;
            let v = Tensor::zeros((slots, num_kv_heads, head_dim), dtype, device)?;
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
