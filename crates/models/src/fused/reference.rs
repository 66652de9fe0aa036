//! The device-generic references: candle ops only, on any device and dtype. They are the
//! oracle of the start-up check and the path of any op whose fused kernel is absent or refused.

use candle_core::{Tensor, D};

use super::OpArgs;
use crate::attention::{causal_mask, StepTables};
use crate::Result;

pub fn add_rms_norm(x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let sum = (x + delta)?;
    let normed = candle_nn::ops::rms_norm(&sum.contiguous()?, w, eps)?;
    Ok((sum, normed))
}

pub fn silu_mul(gu: &Tensor, inter: usize) -> Result<Tensor> {
    let gate = gu.narrow(D::Minus1, 0, inter)?;
    let up = gu.narrow(D::Minus1, inter, inter)?;
    Ok((gate.silu()? * up)?)
}

/// Rotate `x` `[T, heads, D]` by its tokens' `cos`/`sin` rows `[T, D/2]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    if interleaved {
        let x = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?; // [1, H, T, D]
        let y = candle_nn::rotary_emb::rope_i(&x, cos, sin)?;
        return Ok(y.squeeze(0)?.transpose(0, 1)?.contiguous()?);
    }
    let x = x.unsqueeze(0)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
}

/// Scatter `k`, `v` `[T, kv_heads, D]` into their slots of the caches, converted to the
/// caches' type (`--kv-cache-dtype` may be narrower than the activations).
pub fn cache_write(k_cache: &Tensor, v_cache: &Tensor, k: &Tensor, v: &Tensor, step: &StepTables) -> Result<()> {
    let index = step.scatter_index()?;
    k_cache.scatter_set(index, &k.to_dtype(k_cache.dtype())?.contiguous()?, 0)?;
    v_cache.scatter_set(index, &v.to_dtype(v_cache.dtype())?.contiguous()?, 0)?;
    Ok(())
}

/// Attention of `q` `[T, heads, D]` over the caches, gathered per sequence through its block
/// table: `[T, heads · D]`. Query heads are grouped per KV head (GQA), so KV heads are never
/// repeated; scores in the activations' type, scaled by `1/sqrt(D)`, causal within the step.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    step: &StepTables,
    window: Option<usize>,
) -> Result<Tensor> {
    let (_t, heads, hd) = q.dims3()?;
    let kv_heads = k_cache.dim(1)?;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(step.meta.seqs.len());
    for (s, context_slots) in step.meta.seqs.iter().zip(step.gather_slots(q.device())?) {
        let ctx = s.ctx_len;
        let qs = q.narrow(0, s.q_start, s.q_len)?; // [q, H, D]
        let qs = qs.transpose(0, 1)?.contiguous()?.reshape((kv_heads, group * s.q_len, hd))?;
        let gather = |c: &Tensor| -> Result<Tensor> {
            Ok(c.index_select(context_slots, 0)?.to_dtype(q.dtype())?.transpose(0, 1)?.contiguous()?)
        };
        let (k, v) = (gather(k_cache)?, gather(v_cache)?); // [KVH, ctx, D]
        let mut scores = (qs.matmul(&k.t()?)? * scale)?; // [KVH, g*q, ctx]
        if s.q_len > 1 || window.is_some_and(|w| w < ctx) {
            let mask = causal_mask(s.q_len, ctx, window, scores.dtype(), scores.device())?;
            scores = scores.reshape((kv_heads, group, s.q_len, ctx))?.broadcast_add(&mask)?.reshape((
                kv_heads,
                group * s.q_len,
                ctx,
            ))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = probs.matmul(&v)?; // [KVH, g*q, D]
        outs.push(o.reshape((heads, s.q_len, hd))?.transpose(0, 1)?.reshape((s.q_len, heads * hd))?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Run `args` on the reference; outputs as [`super::FusedKernel::run`] gives them.
pub fn run(args: &OpArgs) -> Result<Vec<Tensor>> {
    Ok(match *args {
        OpArgs::AddRmsNorm { x, delta, w, eps } => {
            let (a, b) = add_rms_norm(x, delta, w, eps)?;
            vec![a, b]
        }
        OpArgs::SiluMul { gu, inter } => vec![silu_mul(gu, inter)?],
        OpArgs::Rotary { q, k, cos, sin, interleaved } => {
            vec![rotary(q, cos, sin, interleaved)?, rotary(k, cos, sin, interleaved)?]
        }
        OpArgs::CacheWrite { k_cache, v_cache, k, v, step } => {
            cache_write(k_cache, v_cache, k, v, step)?;
            vec![k_cache.clone(), v_cache.clone()]
        }
        OpArgs::PagedAttention { q, k_cache, v_cache, step, window } => {
            vec![paged_attention(q, k_cache, v_cache, step, window)?]
        }
    })
}
