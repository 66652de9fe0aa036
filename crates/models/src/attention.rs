//! Attention over the paged KV cache: the per-step metadata every layer shares.
//!
//! A step's new keys/values go to their cache slots, then each sequence attends over the slots
//! of its context (through its block table). The ops themselves (cache write, paged
//! attention) are in [`crate::fused`]: a device-generic reference of candle ops, and the fused
//! kernels (CPU, CUDA) checked against it. [`StepTables`] holds what those ops need of the
//! step's metadata in the form each one reads, built once per step on first use, not per layer.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Result};

/// The attention span of one sequence in a batch.
#[derive(Debug, Clone)]
pub struct SeqAttention {
    /// First row of this sequence's queries in the flat batch.
    pub q_start: usize,
    /// Number of query tokens of this sequence in this step.
    pub q_len: usize,
    /// Length of the whole context (cached prefix + this step's tokens).
    pub ctx_len: usize,
    /// The blocks holding the context (at least `ctx_len / block_size`, rounded up), on the host:
    /// a step costs O(blocks) per sequence, not O(context).
    pub block_table: Vec<u32>,
}

impl SeqAttention {
    /// Cache slot of every context position (the reference gathers through them).
    pub(crate) fn context_slots(&self, block_size: usize) -> Vec<u32> {
        let bs = block_size as u32;
        (0..self.ctx_len as u32).map(|j| self.block_table[(j / bs) as usize] * bs + j % bs).collect()
    }
}

/// Per-batch attention inputs, shared by all layers.
#[derive(Debug, Clone)]
pub struct AttentionMetadata {
    /// Cache slot for each new token, `[T]` u32.
    pub slot_mapping: Tensor,
    /// Tokens per cache block.
    pub block_size: usize,
    /// One entry per sequence, in batch order.
    pub seqs: Vec<SeqAttention>,
}

/// Causal mask for `q_len` queries at the end of a `ctx`-long context, each seeing at most
/// its last `window` positions when given: `[q_len, ctx]`.
pub(crate) fn causal_mask(
    q_len: usize,
    ctx: usize,
    window: Option<usize>,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let offset = ctx - q_len;
    let w = window.unwrap_or(usize::MAX);
    let seen = move |i: usize, j: usize| j <= offset + i && offset + i - j < w;
    let mask: Vec<f32> =
        (0..q_len).flat_map(|i| (0..ctx).map(move |j| if seen(i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(mask, (q_len, ctx), dev)?.to_dtype(dtype)?)
}

/// The block tables packed for a device kernel: `tables` `[S, stride]` (rows padded with
/// block 0), `seqs` `[S * 3]` as (first query row, query rows, context length), `seq_of_row`
/// `[T]` (the sequence of each query row); u32 on the step's device.
#[derive(Debug, Clone)]
pub struct PackedTables {
    pub tables: Tensor,
    pub stride: usize,
    pub seqs: Tensor,
    pub seq_of_row: Tensor,
    /// One past the largest cache slot any table reaches (checked against the cache's size).
    pub slot_end: usize,
}

/// One step's attention metadata in the forms the ops read, each built on first use.
pub struct StepTables<'a> {
    pub meta: &'a AttentionMetadata,
    pub kv_heads: usize,
    pub head_dim: usize,
    host_slots: OnceLock<Vec<u32>>,
    scatter: OnceLock<Tensor>,
    gather: OnceLock<Vec<Tensor>>,
    packed: OnceLock<PackedTables>,
}

/// `cell`'s value, building it with `f` the first time.
fn lazily<T>(cell: &OnceLock<T>, f: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = f()?;
    Ok(cell.get_or_init(|| v))
}

impl<'a> StepTables<'a> {
    pub fn new(meta: &'a AttentionMetadata, kv_heads: usize, head_dim: usize) -> Self {
        let (host_slots, scatter, gather, packed) = Default::default();
        Self { meta, kv_heads, head_dim, host_slots, scatter, gather, packed }
    }

    /// Rows of this step (new tokens).
    pub fn rows(&self) -> Result<usize> {
        Ok(self.meta.slot_mapping.dim(0)?)
    }

    /// The new tokens' cache slots on the host.
    pub fn host_slots(&self) -> Result<&[u32]> {
        lazily(&self.host_slots, || Ok(self.meta.slot_mapping.to_vec1::<u32>()?)).map(|v| v.as_slice())
    }

    /// The slot mapping broadcast to `[T, kv_heads, head_dim]`, for candle's `scatter_set`.
    pub fn scatter_index(&self) -> Result<&Tensor> {
        lazily(&self.scatter, || {
            let (s, t) = (&self.meta.slot_mapping, self.rows()?);
            Ok(s.reshape((t, 1, 1))?.broadcast_as((t, self.kv_heads, self.head_dim))?.contiguous()?)
        })
    }

    /// Each sequence's context slots on `dev`, for candle's gather.
    pub fn gather_slots(&self, dev: &Device) -> Result<&[Tensor]> {
        lazily(&self.gather, || {
            let bs = self.meta.block_size;
            let slots = self.meta.seqs.iter().map(|s| Tensor::new(s.context_slots(bs).as_slice(), dev));
            Ok(slots.collect::<candle_core::Result<Vec<_>>>()?)
        })
        .map(|v| v.as_slice())
    }

    /// The block tables packed for a device kernel, on `dev`.
    pub fn packed(&self, dev: &Device) -> Result<&PackedTables> {
        lazily(&self.packed, || {
            let (meta, rows) = (self.meta, self.rows()?);
            let bs = meta.block_size;
            let blocks = |s: &SeqAttention| s.ctx_len.div_ceil(bs);
            let stride = meta.seqs.iter().map(blocks).max().unwrap_or(0).max(1);
            let mut tables = vec![0u32; meta.seqs.len() * stride];
            let mut seqs = Vec::with_capacity(meta.seqs.len() * 3);
            let mut seq_of_row = vec![u32::MAX; rows];
            let mut slot_end = 0;
            for (i, s) in meta.seqs.iter().enumerate() {
                let used = s.block_table.get(..blocks(s)).ok_or_else(|| {
                    ModelError::Config(format!(
                        "sequence {i}: {} blocks for a context of {}",
                        s.block_table.len(),
                        s.ctx_len
                    ))
                })?;
                tables[i * stride..i * stride + used.len()].copy_from_slice(used);
                slot_end = used.iter().map(|&b| (b as usize + 1) * bs).fold(slot_end, usize::max);
                if s.q_len > s.ctx_len || s.q_start + s.q_len > rows {
                    return Err(ModelError::Config(format!("sequence {i}: rows outside the step or the context")));
                }
                let u = |n: usize| u32::try_from(n).map_err(|_| ModelError::Config(format!("{n} exceeds u32")));
                seqs.extend([u(s.q_start)?, u(s.q_len)?, u(s.ctx_len)?]);
                seq_of_row[s.q_start..s.q_start + s.q_len].fill(u(i)?);
            }
            if seq_of_row.contains(&u32::MAX) {
                return Err(ModelError::Config("a query row belongs to no sequence".into()));
            }
            let n = meta.seqs.len();
            Ok(PackedTables {
                tables: Tensor::from_vec(tables, (n, stride), dev)?,
                stride,
                seqs: Tensor::from_vec(seqs, n * 3, dev)?,
                seq_of_row: Tensor::from_vec(seq_of_row, rows, dev)?,
                slot_end,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_tables_hold_each_sequence_and_row() -> Result<()> {
        let dev = Device::Cpu;
        let meta = AttentionMetadata {
            slot_mapping: Tensor::new(&[20u32, 8, 9, 10], &dev)?,
            block_size: 4,
            seqs: vec![
                SeqAttention { q_start: 0, q_len: 1, ctx_len: 9, block_table: vec![3, 1, 5] },
                SeqAttention { q_start: 1, q_len: 3, ctx_len: 3, block_table: vec![2, 7] },
            ],
        };
        let step = StepTables::new(&meta, 2, 8);
        let p = step.packed(&dev)?;
        // The unused trailing block of the second table is not read, so not counted.
        assert_eq!((p.stride, p.slot_end), (3, 24));
        assert_eq!(p.tables.to_vec2::<u32>()?, vec![vec![3, 1, 5], vec![2, 0, 0]]);
        assert_eq!(p.seqs.to_vec1::<u32>()?, vec![0, 1, 9, 1, 3, 3]);
        assert_eq!(p.seq_of_row.to_vec1::<u32>()?, vec![0, 1, 1, 1]);
        assert_eq!(step.host_slots()?, &[20, 8, 9, 10]);
        assert_eq!(step.scatter_index()?.dims(), &[4, 2, 8]);
        assert_eq!(step.gather_slots(&dev)?[1].to_vec1::<u32>()?, vec![8, 9, 10]);
        // A table too short for its context is an error, not a wild read.
        let short = AttentionMetadata {
            seqs: vec![SeqAttention { q_start: 0, q_len: 4, ctx_len: 9, block_table: vec![3] }],
            ..meta.clone()
        };
        assert!(StepTables::new(&short, 2, 8).packed(&dev).is_err());
        Ok(())
    }
}
