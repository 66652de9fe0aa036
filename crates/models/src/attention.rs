//! Attention over the paged KV cache, device-generic (candle ops only).
//!
//! New keys/values are scattered into their cache slots, then each sequence attends over
//! the slots of its context (gathered through its block table). GQA is handled by grouping
//! query heads per KV head, so KV heads are never materialised repeatedly.

use candle_core::{DType, Device, Tensor};

use crate::Result;

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
    /// Cache slot of every context position (the non-CPU path gathers through them).
    fn context_slots(&self, block_size: usize) -> Vec<u32> {
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

/// Causal mask for `q_len` queries at the end of a `ctx`-long context: `[q_len, ctx]`.
fn causal_mask(q_len: usize, ctx: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let offset = ctx - q_len;
    let mask: Vec<f32> =
        (0..q_len).flat_map(|i| (0..ctx).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (q_len, ctx), dev)?.to_dtype(dtype)?)
}

/// Where a step's new keys/values go: on the CPU the slots on the host (our cache-write
/// kernel, in place, converting to the cache's type); elsewhere the slot mapping broadcast to
/// `[T, kv_heads, head_dim]` for candle's `scatter_set`.
pub(crate) enum CacheWriter {
    Host(Vec<u32>),
    Scatter(Tensor),
}

impl CacheWriter {
    pub(crate) fn new(meta: &AttentionMetadata, kv_heads: usize, head_dim: usize) -> Result<Self> {
        let slots = &meta.slot_mapping;
        if slots.device().is_cpu() {
            return Ok(Self::Host(slots.to_vec1::<u32>()?));
        }
        let t = slots.dim(0)?;
        Ok(Self::Scatter(slots.reshape((t, 1, 1))?.broadcast_as((t, kv_heads, head_dim))?.contiguous()?))
    }

    /// Write `k`, `v` (`[T, kv_heads, head_dim]`) into their slots of the layer's caches
    /// (which may hold a narrower type than the model computes in: `--kv-cache-dtype`).
    pub(crate) fn write(&self, k_cache: &Tensor, v_cache: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        match self {
            Self::Host(slots) => {
                // The kernel takes f32 rows (a no-op cast when they already are).
                k_cache.inplace_op2(&k.to_dtype(DType::F32)?.contiguous()?, &HostWrite(slots))?;
                v_cache.inplace_op2(&v.to_dtype(DType::F32)?.contiguous()?, &HostWrite(slots))?;
            }
            Self::Scatter(index) => {
                k_cache.scatter_set(index, &k.to_dtype(k_cache.dtype())?.contiguous()?, 0)?;
                v_cache.scatter_set(index, &v.to_dtype(v_cache.dtype())?.contiguous()?, 0)?;
            }
        }
        Ok(())
    }
}

/// The in-place CPU cache write of one step's f32 rows at their host slots.
struct HostWrite<'a>(&'a [u32]);

impl candle_core::InplaceOp2 for HostWrite<'_> {
    fn name(&self) -> &'static str {
        "tessera-cache-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut candle_core::CpuStorage,
        cl: &candle_core::Layout,
        rows: &candle_core::CpuStorage,
        rl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        use tessera_kernels::write_cache_rows;
        let (CpuStorage::F32(src), true, true) = (rows, rl.is_contiguous(), cl.is_contiguous()) else {
            candle_core::bail!("the cache write takes contiguous f32 rows into a contiguous cache")
        };
        let n = rl.shape().elem_count();
        let src = &src[rl.start_offset()..rl.start_offset() + n];
        let row = n / self.0.len().max(1);
        let o = cl.start_offset();
        let r = match cache {
            CpuStorage::F32(c) => write_cache_rows(&mut c[o..], src, self.0, row),
            CpuStorage::F16(c) => write_cache_rows(&mut c[o..], src, self.0, row),
            CpuStorage::BF16(c) => write_cache_rows(&mut c[o..], src, self.0, row),
            _ => candle_core::bail!("KV cache dtype without a CPU cache write"),
        };
        r.map_err(|e| candle_core::Error::Msg(format!("cache write: {e}")))
    }
}

/// Off the CPU, each sequence's context slots as a device tensor for candle's gather, built
/// once per step (not per layer); `None` on the CPU, where the kernel reads the block tables.
pub(crate) struct DeviceSlots(Vec<Tensor>);

impl DeviceSlots {
    pub(crate) fn new(meta: &AttentionMetadata, dev: &Device) -> Result<Option<Self>> {
        if dev.is_cpu() {
            return Ok(None);
        }
        Ok(Some(Self::build(meta, dev)?))
    }

    /// The slot tensors on `dev`, whatever the device (tests take the gather path on the CPU).
    fn build(meta: &AttentionMetadata, dev: &Device) -> Result<Self> {
        let slots = meta.seqs.iter().map(|s| Tensor::new(s.context_slots(meta.block_size).as_slice(), dev));
        Ok(Self(slots.collect::<candle_core::Result<_>>()?))
    }
}

/// Our CPU kernel over the cache in place (f32, f16 or bf16 cache; f32 math).
fn cpu_paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    num_kv_heads: usize,
) -> Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    use tessera_kernels::{AttnShape, Isa, SeqSpan};
    let (t, heads, hd) = q.dims3()?;
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let shape = AttnShape { heads, kv_heads: num_kv_heads, head_dim: hd, block_size: meta.block_size };
    let seqs: Vec<SeqSpan> = meta
        .seqs
        .iter()
        .map(|s| SeqSpan { q_start: s.q_start, q_len: s.q_len, ctx: s.ctx_len, blocks: &s.block_table })
        .collect();
    let mut out = vec![0f32; t * heads * hd];
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k_cache.storage_and_layout();
        let (vs, vl) = v_cache.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
            return Err(crate::ModelError::Config("CPU attention on non-CPU tensors".into()));
        };
        let qv = &qs.as_slice::<f32>()?[ql.start_offset()..ql.start_offset() + t * heads * hd];
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let isa = Isa::active();
        let r = match (ks, vs) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => {
                tessera_kernels::paged_attention(isa, qv, &k[ko..], &v[vo..], &seqs, shape, &mut out)
            }
            (CpuStorage::F16(k), CpuStorage::F16(v)) => {
                tessera_kernels::paged_attention(isa, qv, &k[ko..], &v[vo..], &seqs, shape, &mut out)
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                tessera_kernels::paged_attention(isa, qv, &k[ko..], &v[vo..], &seqs, shape, &mut out)
            }
            _ => return Err(crate::ModelError::Config("KV cache dtype without a CPU attention kernel".into())),
        };
        r.map_err(|e| crate::ModelError::Config(format!("attention: {e}")))?;
    }
    Ok(Tensor::from_vec(out, (t, heads * hd), q.device())?.to_dtype(dtype)?)
}

/// Attention for every sequence of the batch. `q` is `[T, heads, head_dim]`; the cache
/// already holds this step's keys/values. Returns `[T, heads * head_dim]`. On the CPU our
/// kernel reads the cache in place through the block tables; elsewhere (with `device` slot
/// tensors) candle ops gather it.
pub(crate) fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    num_kv_heads: usize,
    device: Option<&DeviceSlots>,
) -> Result<Tensor> {
    let Some(device) = device else {
        return cpu_paged_attention(q, k_cache, v_cache, meta, num_kv_heads);
    };
    let (_t, heads, hd) = q.dims3()?;
    let group = heads / num_kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(meta.seqs.len());
    for (s, context_slots) in meta.seqs.iter().zip(&device.0) {
        let ctx = s.ctx_len;
        let qs = q.narrow(0, s.q_start, s.q_len)?; // [q, H, D]
        let qs = qs.transpose(0, 1)?.contiguous()?.reshape((num_kv_heads, group * s.q_len, hd))?;
        let gather = |c: &Tensor| -> Result<Tensor> {
            Ok(c.index_select(context_slots, 0)?.to_dtype(q.dtype())?.transpose(0, 1)?.contiguous()?)
        };
        let (k, v) = (gather(k_cache)?, gather(v_cache)?); // [KVH, ctx, D]
        let mut scores = (qs.matmul(&k.t()?)? * scale)?; // [KVH, g*q, ctx]
        if s.q_len > 1 {
            let mask = causal_mask(s.q_len, ctx, scores.dtype(), scores.device())?;
            scores = scores.reshape((num_kv_heads, group, s.q_len, ctx))?.broadcast_add(&mask)?.reshape((
                num_kv_heads,
                group * s.q_len,
                ctx,
            ))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = probs.matmul(&v)?; // [KVH, g*q, D]
        let o = o.reshape((heads, s.q_len, hd))?.transpose(0, 1)?.reshape((s.q_len, heads * hd))?;
        outs.push(o);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Reference attention without a cache, for tests: full causal attention of one sequence.
#[cfg(test)]
fn dense_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (t, heads, hd) = q.dims3()?;
    let kvh = k.dim(1)?;
    let group = heads / kvh;
    let k = k.unsqueeze(2)?.expand((t, kvh, group, hd))?.reshape((t, heads, hd))?;
    let v = v.unsqueeze(2)?.expand((t, kvh, group, hd))?.reshape((t, heads, hd))?;
    let q = q.transpose(0, 1)?.contiguous()?;
    let k = k.transpose(0, 1)?.contiguous()?;
    let v = v.transpose(0, 1)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    let mask = causal_mask(t, t, scores.dtype(), scores.device())?;
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
    Ok(p.matmul(&v)?.transpose(0, 1)?.reshape((t, heads * hd))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paged attention over scattered slots equals dense causal attention.
    #[test]
    fn paged_equals_dense() -> Result<()> {
        let dev = Device::Cpu;
        let (t, h, kvh, d) = (5, 4, 2, 8);
        let q = Tensor::randn(0f32, 1., (t, h, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (t, kvh, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (t, kvh, d), &dev)?;
        let kc = Tensor::zeros((16, kvh, d), DType::F32, &dev)?;
        let vc = Tensor::zeros((16, kvh, d), DType::F32, &dev)?;
        // Blocks of 4: the table [2, 0] puts positions 0..4 in slots 8..12 and position 4 in slot 0.
        let (bs, table) = (4, vec![2u32, 0]);
        let slots = Tensor::new(&[8u32, 9, 10, 11, 0], &dev)?;
        let idx = slots.reshape((t, 1, 1))?.broadcast_as((t, kvh, d))?.contiguous()?;
        // The scatter path (other devices) and the host path write the same cells.
        let (kc2, vc2) = (kc.zeros_like()?, vc.zeros_like()?);
        CacheWriter::Scatter(idx).write(&kc, &vc, &k, &v)?;
        CacheWriter::Host(slots.to_vec1()?).write(&kc2, &vc2, &k, &v)?;
        for (a, b) in [(&kc, &kc2), (&vc, &vc2)] {
            assert_eq!(a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);
        }
        // Two steps: a prefill of 3 then 2 more tokens, attending over the cache.
        let meta1 = AttentionMetadata {
            slot_mapping: slots.narrow(0, 0, 3)?,
            block_size: bs,
            seqs: vec![SeqAttention { q_start: 0, q_len: 3, ctx_len: 3, block_table: table[..1].to_vec() }],
        };
        let gather1 = DeviceSlots::build(&meta1, &dev)?;
        let a = paged_attention(&q.narrow(0, 0, 3)?, &kc, &vc, &meta1, kvh, Some(&gather1))?;
        let a_cpu = paged_attention(&q.narrow(0, 0, 3)?, &kc, &vc, &meta1, kvh, None)?;
        let meta2 = AttentionMetadata {
            slot_mapping: slots.narrow(0, 3, 2)?,
            block_size: bs,
            seqs: vec![SeqAttention { q_start: 0, q_len: 2, ctx_len: 5, block_table: table.clone() }],
        };
        assert_eq!(meta2.seqs[0].context_slots(bs), slots.to_vec1::<u32>()?);
        let gather2 = DeviceSlots::build(&meta2, &dev)?;
        let b = paged_attention(&q.narrow(0, 3, 2)?, &kc, &vc, &meta2, kvh, Some(&gather2))?;
        let b_cpu = paged_attention(&q.narrow(0, 3, 2)?, &kc, &vc, &meta2, kvh, None)?;
        let want = dense_causal_attention(&q, &k, &v)?;
        for (path, got) in [("candle ops", Tensor::cat(&[a, b], 0)?), ("CPU kernel", Tensor::cat(&[a_cpu, b_cpu], 0)?)]
        {
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{path}: max diff {diff}");
        }
        Ok(())
    }
}
