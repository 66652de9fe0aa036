//! The CUDA kernels of `kernels/cuda` (built by `tessera-kernels` with the `cuda` feature) as
//! fused candidates: each launches on the tensors' own CUDA storage and stream. The fatbins
//! are loaded once per device (SASS for sm_80/sm_90, PTX that newer GPUs compile at load).
//! Like every candidate they run only after the start-up check has compared them with the
//! references on the GPU itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Storage, Tensor};
use tessera_kernels::cuda::{self as images, Dt, FusedOp as Entry};

use super::{FusedKernel, FusedOp, OpArgs};
use crate::{ModelError, Result};

/// One CUDA kernel.
#[derive(Debug, Clone, Copy)]
pub struct CudaFused(pub FusedOp);

/// The GPU's candidates: every op.
pub fn candidates() -> Vec<Arc<dyn FusedKernel>> {
    FusedOp::ALL.iter().map(|&op| Arc::new(CudaFused(op)) as Arc<dyn FusedKernel>).collect()
}

fn cuda_err(e: impl std::fmt::Debug) -> ModelError {
    ModelError::Config(format!("CUDA: {e:?}"))
}

fn dt(d: DType) -> Option<Dt> {
    match d {
        DType::F32 => Some(Dt::F32),
        DType::F16 => Some(Dt::F16),
        DType::BF16 => Some(Dt::Bf16),
        _ => None,
    }
}

/// The three fatbins, in `images::PTX` order.
#[derive(Clone, Copy)]
enum Image {
    Attention,
    Cache,
    Fused,
}

/// The loaded modules of one device and the functions looked up so far.
struct Loaded {
    modules: [Arc<CudaModule>; 3],
    functions: Mutex<HashMap<String, CudaFunction>>,
}

/// Modules per CUDA context (a context lives as long as the process).
fn loaded(dev: &CudaDevice) -> Result<Arc<Loaded>> {
    static ALL: OnceLock<Mutex<HashMap<usize, Arc<Loaded>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key = Arc::as_ptr(ctx) as usize;
    let mut all = ALL.get_or_init(Default::default).lock().map_err(|_| cuda_err("the module table is poisoned"))?;
    if let Some(l) = all.get(&key) {
        return Ok(l.clone());
    }
    let load = |bytes: &[u8]| ctx.load_module(Ptx::from_binary(bytes.to_vec())).map_err(cuda_err);
    let modules = [load(images::ATTENTION)?, load(images::CACHE)?, load(images::FUSED)?];
    let l = Arc::new(Loaded { modules, functions: Mutex::default() });
    all.insert(key, l.clone());
    Ok(l)
}

fn function(dev: &CudaDevice, image: Image, name: &str) -> Result<CudaFunction> {
    let l = loaded(dev)?;
    let mut f = l.functions.lock().map_err(|_| cuda_err("the function table is poisoned"))?;
    if let Some(func) = f.get(name) {
        return Ok(func.clone());
    }
    let func = l.modules[image as usize].load_function(name).map_err(cuda_err)?;
    f.insert(name.to_string(), func.clone());
    Ok(func)
}

/// The contiguous elements of a CUDA tensor's storage.
fn view<'s, T: CudaDType>(s: &'s CudaStorage, l: &Layout) -> Result<CudaView<'s, T>> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| ModelError::Config("a CUDA kernel needs contiguous input".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `t`'s CUDA storage, read-locked, and its layout.
macro_rules! cuda_storage {
    ($t:expr => $g:ident, $s:ident, $l:ident) => {
        let ($g, $l) = $t.storage_and_layout();
        let Storage::Cuda($s) = &*$g else {
            return Err(ModelError::Config("a CUDA kernel was handed a tensor on another device".into()));
        };
    };
}

/// Bind `$T` to the Rust type of `$dtype` (f32, f16, bf16) in `$body`.
macro_rules! by_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err(ModelError::Config(format!("no CUDA kernel for {other:?}"))),
        }
    };
}

fn u32_of(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| ModelError::Config(format!("{n} exceeds a kernel's u32 argument")))
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_536) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A fresh tensor over `out` on `dev`.
fn wrap<T: CudaDType>(
    out: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    dims: &[usize],
) -> Tensor {
    Tensor::from_storage(Storage::Cuda(T::wrap_cuda_slice(out, dev.clone())), dims, BackpropOp::none(), false)
}

fn on_cuda(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else { return false };
    ts.iter().all(|t| t.device().is_cuda() && t.device().same_device(first.device()) && t.is_contiguous())
}

fn same_dtype(ts: &[&Tensor]) -> bool {
    ts.windows(2).all(|w| w[0].dtype() == w[1].dtype()) && ts.first().is_some_and(|t| dt(t.dtype()).is_some())
}

impl FusedKernel for CudaFused {
    fn op(&self) -> FusedOp {
        self.0
    }

    fn name(&self) -> &'static str {
        match self.0 {
            FusedOp::AddRmsNorm => "cuda_add_rms_norm",
            FusedOp::SiluMul => "cuda_silu_mul",
            FusedOp::Rotary => "cuda_rotary_qk",
            FusedOp::CacheWrite => "cuda_reshape_and_cache",
            FusedOp::PagedAttention => "cuda_paged_attention",
        }
    }

    fn supports(&self, args: &OpArgs) -> bool {
        match (self.0, *args) {
            (FusedOp::AddRmsNorm, OpArgs::AddRmsNorm { x, delta, w, .. }) => {
                on_cuda(&[x, delta, w]) && same_dtype(&[x, delta, w]) && x.dims() == delta.dims()
            }
            (FusedOp::SiluMul, OpArgs::SiluMul { gu, inter }) => {
                on_cuda(&[gu]) && same_dtype(&[gu]) && gu.dims().last() == Some(&(2 * inter))
            }
            (FusedOp::Rotary, OpArgs::Rotary { q, k, cos, sin, .. }) => {
                on_cuda(&[q, k, cos, sin]) && same_dtype(&[q, k, cos, sin]) && q.rank() == 3 && k.rank() == 3
            }
            (FusedOp::CacheWrite, OpArgs::CacheWrite { k_cache, v_cache, k, v, .. }) => {
                let pair = |src: DType, cache: DType| matches!((dt(src), dt(cache)), (Some(s), Some(c)) if images::cache_entry(s, c).is_some());
                on_cuda(&[k_cache, v_cache, k, v])
                    && pair(k.dtype(), k_cache.dtype())
                    && pair(v.dtype(), v_cache.dtype())
            }
            (FusedOp::PagedAttention, OpArgs::PagedAttention { q, k_cache, v_cache, .. }) => {
                let entry = match (dt(q.dtype()), dt(k_cache.dtype()), q.dims3()) {
                    (Some(qd), Some(cd), Ok((_, _, d))) => images::attention_entry(qd, cd, d).is_some(),
                    _ => false,
                };
                entry && on_cuda(&[q, k_cache, v_cache]) && k_cache.dtype() == v_cache.dtype()
            }
            _ => false,
        }
    }

    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>> {
        match *args {
            OpArgs::AddRmsNorm { x, delta, w, eps } => add_rms_norm(x, delta, w, eps),
            OpArgs::SiluMul { gu, inter } => silu_mul(gu, inter).map(|t| vec![t]),
            OpArgs::Rotary { q, k, cos, sin, interleaved } => rotary(q, k, cos, sin, interleaved),
            OpArgs::CacheWrite { k_cache, v_cache, k, v, step } => {
                let slots = step.meta.slot_mapping.contiguous()?;
                // Every slot inside the cache, checked on the host before the kernel writes.
                let end = step.host_slots()?.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
                if end > k_cache.dim(0)? || end > v_cache.dim(0)? {
                    return Err(ModelError::Config(format!("slot {} outside a cache of {}", end - 1, k_cache.dim(0)?)));
                }
                k_cache.inplace_op2(&k.contiguous()?, &CacheWrite(&slots))?;
                v_cache.inplace_op2(&v.contiguous()?, &CacheWrite(&slots))?;
                Ok(vec![k_cache.clone(), v_cache.clone()])
            }
            OpArgs::PagedAttention { q, k_cache, v_cache, step } => {
                paged_attention(q, k_cache, v_cache, step).map(|t| vec![t])
            }
        }
    }
}

fn add_rms_norm(x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32) -> Result<Vec<Tensor>> {
    let dim = w.elem_count();
    let rows = x.elem_count() / dim.max(1);
    cuda_storage!(x => gx, xs, xl);
    cuda_storage!(delta => gd, ds, dl);
    cuda_storage!(w => gw, ws, wl);
    let dev = xs.device().clone();
    let cfg = LaunchConfig { grid_dim: (u32_of(rows)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let out = by_dtype!(x.dtype(), T => {
        let f = function(&dev, Image::Fused, &images::fused_entry(Entry::AddRmsNorm, dt(x.dtype()).unwrap_or(Dt::F32)))?;
        // SAFETY: the kernel writes all 2·rows·dim outputs (sums, then normed rows).
        let mut out = unsafe { dev.alloc::<T>(2 * rows * dim)? };
        let (xv, dv, wv) = (view::<T>(xs, xl)?, view::<T>(ds, dl)?, view::<T>(ws, wl)?);
        let (r, d) = (u32_of(rows)?, u32_of(dim)?);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out).arg(&xv).arg(&dv).arg(&wv).arg(&r).arg(&d).arg(&eps);
        // SAFETY: the arguments match the kernel's signature; every pointer covers its extent.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(wrap(out, &dev, &[2, rows, dim]))
    })?;
    drop((gx, gd, gw));
    Ok(vec![out.get(0)?.reshape(x.dims())?, out.get(1)?.reshape(x.dims())?])
}

fn silu_mul(gu: &Tensor, inter: usize) -> Result<Tensor> {
    let rows = gu.elem_count() / (2 * inter).max(1);
    let mut dims = gu.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = inter;
    }
    cuda_storage!(gu => g, s, l);
    let dev = s.device().clone();
    let out = by_dtype!(gu.dtype(), T => {
        let f = function(&dev, Image::Fused, &images::fused_entry(Entry::SiluMul, dt(gu.dtype()).unwrap_or(Dt::F32)))?;
        // SAFETY: the kernel writes all rows·inter outputs.
        let mut out = unsafe { dev.alloc::<T>(rows * inter)? };
        let v = view::<T>(s, l)?;
        let (r, i) = (u32_of(rows)?, u32_of(inter)?);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out).arg(&v).arg(&r).arg(&i);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(elementwise(rows * inter)) }.map_err(cuda_err)?;
        Ok(wrap(out, &dev, &dims))
    })?;
    drop(g);
    Ok(out)
}

fn rotary(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Vec<Tensor>> {
    let (t, heads, d) = q.dims3()?;
    let (_, kv_heads, _) = k.dims3()?;
    if cos.elem_count() != t * d / 2 || sin.elem_count() != t * d / 2 || k.dim(0)? != t {
        return Err(ModelError::Config("rotary: tables or keys do not match the queries".into()));
    }
    cuda_storage!(q => gq, qs, ql);
    cuda_storage!(k => gk, ks, kl);
    cuda_storage!(cos => gc, cs, cl);
    cuda_storage!(sin => gs, ss, sl);
    let dev = qs.device().clone();
    let out = by_dtype!(q.dtype(), T => {
        let f = function(&dev, Image::Fused, &images::fused_entry(Entry::RotaryQk, dt(q.dtype()).unwrap_or(Dt::F32)))?;
        let n = t * (heads + kv_heads) * d;
        // SAFETY: the kernel writes every element of q' and k' (each pair of each row).
        let mut out = unsafe { dev.alloc::<T>(n)? };
        let (qv, kv, cv, sv) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(cs, cl)?, view::<T>(ss, sl)?);
        let args = [u32_of(t)?, u32_of(heads)?, u32_of(kv_heads)?, u32_of(d)?, u32::from(interleaved)];
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out).arg(&qv).arg(&kv).arg(&cv).arg(&sv);
        for a in &args {
            b.arg(a);
        }
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(elementwise(t * (heads + kv_heads) * d / 2)) }.map_err(cuda_err)?;
        Ok(wrap(out, &dev, &[n]))
    })?;
    drop((gq, gk, gc, gs));
    let q2 = out.narrow(0, 0, t * heads * d)?.reshape((t, heads, d))?;
    let k2 = out.narrow(0, t * heads * d, t * kv_heads * d)?.reshape((t, kv_heads, d))?;
    Ok(vec![q2, k2])
}

/// Reshape-and-cache of one cache: rows `[T, kv_heads, D]` to their slots, in place.
struct CacheWrite<'a>(&'a Tensor);

impl candle_core::InplaceOp2 for CacheWrite<'_> {
    fn name(&self) -> &'static str {
        "tessera-cuda-reshape-and-cache"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("the CUDA cache write takes CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cl: &Layout,
        rows: &CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<()> {
        let err = |e: ModelError| candle_core::Error::Msg(e.to_string());
        let (Some(src), Some(dst)) = (dt(rows.dtype()), dt(cache.dtype())) else {
            candle_core::bail!("no CUDA cache write for {:?} into {:?}", rows.dtype(), cache.dtype())
        };
        let Some(name) = images::cache_entry(src, dst) else {
            candle_core::bail!("no CUDA cache write for {:?} into {:?}", rows.dtype(), cache.dtype())
        };
        let n = self.0.elem_count();
        let row_len = rl.shape().elem_count() / n.max(1);
        let dev = cache.device().clone();
        let f = function(&dev, Image::Cache, &name).map_err(err)?;
        let (slots_g, slots_l) = self.0.storage_and_layout();
        let Storage::Cuda(ss) = &*slots_g else { candle_core::bail!("the slot mapping is not on the GPU") };
        let slots = view::<u32>(ss, slots_l).map_err(err)?;
        let (a, _) = cl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("non-contiguous cache".into()))?;
        let (nn, rr) = (u32_of(n).map_err(err)?, u32_of(row_len).map_err(err)?);
        let stream = dev.cuda_stream();
        macro_rules! launch {
            ($C:ty, $S:ty) => {{
                let mut c = cache.as_cuda_slice_mut::<$C>()?.slice_mut(a..);
                let r = view::<$S>(rows, rl).map_err(err)?;
                let mut b = stream.launch_builder(&f);
                b.arg(&mut c).arg(&r).arg(&slots).arg(&nn).arg(&rr);
                // SAFETY: the arguments match the kernel's signature; every slot was checked
                // against the cache's size by the caller.
                unsafe { b.launch(elementwise(n * row_len)) }.map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
            }};
        }
        match (dst, src) {
            (Dt::F32, Dt::F32) => launch!(f32, f32),
            (Dt::F16, Dt::F32) => launch!(half::f16, f32),
            (Dt::Bf16, Dt::F32) => launch!(half::bf16, f32),
            (Dt::F16, Dt::F16) => launch!(half::f16, half::f16),
            (Dt::Bf16, Dt::Bf16) => launch!(half::bf16, half::bf16),
            _ => candle_core::bail!("no CUDA cache write for {src:?} into {dst:?}"),
        }
        Ok(())
    }
}

fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    step: &crate::attention::StepTables,
) -> Result<Tensor> {
    let (t, heads, d) = q.dims3()?;
    let kv_heads = k_cache.dim(1)?;
    let (Some(qd), Some(cd)) = (dt(q.dtype()), dt(k_cache.dtype())) else {
        return Err(ModelError::Config("no CUDA attention for these types".into()));
    };
    let name = images::attention_entry(qd, cd, d)
        .ok_or_else(|| ModelError::Config(format!("no CUDA attention for head_dim {d}")))?;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(ModelError::Config(format!("{heads} heads over {kv_heads} KV heads")));
    }
    let packed = step.packed(q.device())?;
    if packed.slot_end > k_cache.dim(0)? || packed.slot_end > v_cache.dim(0)? {
        return Err(ModelError::Config(format!(
            "block tables reach slot {} of a cache of {}",
            packed.slot_end,
            k_cache.dim(0)?
        )));
    }
    cuda_storage!(q => gq, qs, ql);
    cuda_storage!(k_cache => gk, ks, kl);
    cuda_storage!(v_cache => gv, vs, vl);
    cuda_storage!(packed.tables => gt, ts, tl);
    cuda_storage!(packed.seqs => gs, ss, sl);
    cuda_storage!(packed.seq_of_row => gr, rs, rl);
    let dev = qs.device().clone();
    let f = function(&dev, Image::Attention, &name)?;
    let scale = 1.0 / (d as f32).sqrt();
    let dims = [u32_of(packed.stride)?, u32_of(heads)?, u32_of(kv_heads)?, u32_of(step.meta.block_size)?];
    let cfg =
        LaunchConfig { grid_dim: (u32_of(t)?, u32_of(heads)?, 1), block_dim: (u32_of(d)?, 1, 1), shared_mem_bytes: 0 };
    let out = by_dtype!(q.dtype(), Q => {
        // SAFETY: one block per (row, head) writes each of its D outputs.
        let mut out = unsafe { dev.alloc::<Q>(t * heads * d)? };
        let qv = view::<Q>(qs, ql)?;
        let (tv, sv, rv) = (view::<u32>(ts, tl)?, view::<u32>(ss, sl)?, view::<u32>(rs, rl)?);
        let stream = dev.cuda_stream();
        by_dtype!(k_cache.dtype(), C => {
            let (kv, vv) = (view::<C>(ks, kl)?, view::<C>(vs, vl)?);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut out).arg(&qv).arg(&kv).arg(&vv).arg(&tv).arg(&dims[0]).arg(&sv).arg(&rv);
            b.arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&scale);
            // SAFETY: the arguments match the kernel's signature; the tables were checked
            // against the caches' size above.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            Ok(())
        })?;
        Ok(wrap(out, &dev, &[t, heads * d]))
    })?;
    drop((gq, gk, gv, gt, gs, gr));
    Ok(out)
}
