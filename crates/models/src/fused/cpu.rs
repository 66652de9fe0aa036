//! The CPU's fused kernels (`tessera-kernels`): RMSNorm with the residual add, SiluMul, the
//! cache write and paged attention read in place through the block tables. No fused rotary on
//! the CPU (the reference runs). Each converts to and from f32 at its edges as needed.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use tessera_kernels::{AttnShape, Isa, SeqSpan};

use super::{FusedKernel, FusedOp, OpArgs};
use crate::attention::StepTables;
use crate::layers::{kernel_err, with_cpu_f32};
use crate::{ModelError, Result};

/// One CPU kernel.
#[derive(Debug, Clone, Copy)]
pub struct CpuFused(pub FusedOp);

/// The CPU's candidates, one per op it has.
pub fn candidates() -> Vec<Arc<dyn FusedKernel>> {
    [FusedOp::AddRmsNorm, FusedOp::SiluMul, FusedOp::CacheWrite, FusedOp::PagedAttention]
        .into_iter()
        .map(|op| Arc::new(CpuFused(op)) as Arc<dyn FusedKernel>)
        .collect()
}

fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu()
}

fn f32_contiguous(t: &Tensor) -> bool {
    on_cpu(t) && t.dtype() == DType::F32 && t.is_contiguous()
}

/// A cache the CPU kernels read and write in place: contiguous f32, f16 or bf16 on the CPU.
fn cache_ok(c: &Tensor) -> bool {
    on_cpu(c) && c.is_contiguous() && matches!(c.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

impl FusedKernel for CpuFused {
    fn op(&self) -> FusedOp {
        self.0
    }

    fn name(&self) -> &'static str {
        match self.0 {
            FusedOp::AddRmsNorm => "cpu_add_rms_norm",
            FusedOp::SiluMul => "cpu_silu_mul",
            FusedOp::Rotary => "cpu_rotary",
            FusedOp::CacheWrite => "cpu_cache_write",
            FusedOp::PagedAttention => "cpu_paged_attention",
        }
    }

    fn supports(&self, args: &OpArgs) -> bool {
        match (self.0, *args) {
            (FusedOp::AddRmsNorm, OpArgs::AddRmsNorm { x, delta, w, .. }) => {
                f32_contiguous(x) && f32_contiguous(delta) && f32_contiguous(w) && x.dims() == delta.dims()
            }
            (FusedOp::SiluMul, OpArgs::SiluMul { gu, inter }) => {
                f32_contiguous(gu) && gu.dims().last() == Some(&(2 * inter))
            }
            (FusedOp::CacheWrite, OpArgs::CacheWrite { k_cache, v_cache, k, v, .. }) => {
                cache_ok(k_cache) && cache_ok(v_cache) && on_cpu(k) && on_cpu(v)
            }
            (FusedOp::PagedAttention, OpArgs::PagedAttention { q, k_cache, v_cache, .. }) => {
                on_cpu(q) && cache_ok(k_cache) && k_cache.dtype() == v_cache.dtype() && k_cache.dims() == v_cache.dims()
            }
            _ => false,
        }
    }

    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>> {
        let isa = Isa::active();
        match *args {
            OpArgs::AddRmsNorm { x, delta, w, eps } => {
                let n = x.elem_count();
                let (mut xo, mut h) = (vec![0f32; n], vec![0f32; n]);
                with_cpu_f32(x, |xs| {
                    with_cpu_f32(delta, |ds| {
                        with_cpu_f32(w, |w| {
                            tessera_kernels::add_rms_norm(isa, xs, ds, w, eps, &mut xo, &mut h).map_err(kernel_err)
                        })
                    })
                })?;
                Ok(vec![Tensor::from_vec(xo, x.dims(), x.device())?, Tensor::from_vec(h, x.dims(), x.device())?])
            }
            OpArgs::SiluMul { gu, inter } => {
                let rows = gu.elem_count() / (2 * inter);
                let mut out = vec![0f32; rows * inter];
                with_cpu_f32(gu, |data| {
                    tessera_kernels::silu_mul(isa, data, rows, inter, &mut out).map_err(kernel_err)
                })?;
                let mut dims = gu.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = inter;
                }
                Ok(vec![Tensor::from_vec(out, dims, gu.device())?])
            }
            OpArgs::CacheWrite { k_cache, v_cache, k, v, step } => {
                let slots = step.host_slots()?;
                // The kernel takes f32 rows (a no-op cast when they already are).
                k_cache.inplace_op2(&k.to_dtype(DType::F32)?.contiguous()?, &HostWrite(slots))?;
                v_cache.inplace_op2(&v.to_dtype(DType::F32)?.contiguous()?, &HostWrite(slots))?;
                Ok(vec![k_cache.clone(), v_cache.clone()])
            }
            OpArgs::PagedAttention { q, k_cache, v_cache, step, window } => {
                Ok(vec![paged_attention(q, k_cache, v_cache, step, window)?])
            }
            OpArgs::Rotary { .. } => Err(ModelError::Config("the CPU has no fused rotary".into())),
        }
    }
}

/// The in-place CPU cache write of one step's f32 rows at their host slots.
struct HostWrite<'a>(&'a [u32]);

impl candle_core::InplaceOp2 for HostWrite<'_> {
    fn name(&self) -> &'static str {
        "tessera-cache-write"
    }

    fn cpu_fwd(&self, cache: &mut CpuStorage, cl: &Layout, rows: &CpuStorage, rl: &Layout) -> candle_core::Result<()> {
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

/// Our CPU kernel over the cache in place (f32, f16 or bf16 cache; f32 math): `[T, heads · D]`
/// in the queries' type.
fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    step: &StepTables,
    window: Option<usize>,
) -> Result<Tensor> {
    let (t, heads, hd) = q.dims3()?;
    let meta = step.meta;
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let shape = AttnShape {
        heads,
        kv_heads: k_cache.dim(1)?,
        head_dim: hd,
        block_size: meta.block_size,
        window: window.unwrap_or(0),
    };
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
            return Err(ModelError::Config("CPU attention on non-CPU tensors".into()));
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
            _ => return Err(ModelError::Config("KV cache dtype without a CPU attention kernel".into())),
        };
        r.map_err(|e| ModelError::Config(format!("attention: {e}")))?;
    }
    Ok(Tensor::from_vec(out, (t, heads * hd), q.device())?.to_dtype(dtype)?)
}
