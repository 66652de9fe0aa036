//! The CUDA kernels of `kernels/cuda` (built by `tessera-kernels` with the `cuda` feature) as
//! fused candidates, each a candle custom op (`CustomOp1/2/3`, the cache write an `InplaceOp2`)
//! launching on the tensors' own CUDA storage and stream. The fatbins
//! are loaded once per device (SASS for sm_80/sm_90, PTX that newer GPUs compile at load).
//! Like every candidate they run only after the start-up check has compared them with the
//! references on the GPU itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use tessera_kernels::cuda::{self as images, Dt, FusedOp as Entry};

use super::{FusedKernel, FusedOp, OpArgs};
use crate::attention::PackedTables;
use crate::{ModelError, Result};

type CResult<T> = candle_core::Result<T>;

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
fn view<'s, T: CudaDType>(s: &'s CudaStorage, l: &Layout) -> CResult<CudaView<'s, T>> {
    let msg = || candle_core::Error::Msg("a CUDA kernel needs contiguous input".into());
    let (a, b) = l.contiguous_offsets().ok_or_else(msg)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
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
            other => Err(candle_core::Error::Msg(format!("no CUDA kernel for {other:?}"))),
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
            // No sliding window in the CUDA kernel yet: those layers take the reference.
            (FusedOp::PagedAttention, OpArgs::PagedAttention { window: Some(_), .. }) => false,
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
            OpArgs::AddRmsNorm { x, delta, w, eps } => {
                let out = x.apply_op3_no_bwd(delta, w, &AddRmsNorm(eps))?;
                Ok(vec![out.get(0)?.reshape(x.dims())?, out.get(1)?.reshape(x.dims())?])
            }
            OpArgs::SiluMul { gu, inter } => Ok(vec![gu.apply_op1_no_bwd(&SiluMul(inter))?]),
            OpArgs::Rotary { q, k, cos, sin, interleaved } => {
                let (t, heads, d) = q.dims3()?;
                let (kt, kv_heads, kd) = k.dims3()?;
                if cos.elem_count() != t * d / 2 || sin.elem_count() != t * d / 2 || (kt, kd) != (t, d) {
                    return Err(ModelError::Config("rotary: tables or keys do not match the queries".into()));
                }
                let out = q.apply_op2_no_bwd(k, &Rotary { cos, sin, interleaved })?;
                let q2 = out.narrow(0, 0, t * heads * d)?.reshape((t, heads, d))?;
                let k2 = out.narrow(0, t * heads * d, t * kv_heads * d)?.reshape((t, kv_heads, d))?;
                Ok(vec![q2, k2])
            }
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
            OpArgs::PagedAttention { q, k_cache, v_cache, step, .. } => {
                let (heads, kv_heads) = (q.dim(1)?, k_cache.dim(1)?);
                if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
                    return Err(ModelError::Config(format!("{heads} heads over {kv_heads} KV heads")));
                }
                let packed = step.packed(q.device())?;
                if packed.slot_end > k_cache.dim(0)? || packed.slot_end > v_cache.dim(0)? {
                    let cache = k_cache.dim(0)?;
                    return Err(ModelError::Config(format!("block tables reach slot {} of {cache}", packed.slot_end)));
                }
                let op = Attention { packed, block_size: step.meta.block_size };
                Ok(vec![q.apply_op3_no_bwd(k_cache, v_cache, &op)?])
            }
        }
    }
}

/// Our error as a custom op's.
fn ce(e: ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn launch_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA launch: {e:?}"))
}

/// The entry point of a fused op for `d`'s elements.
fn fused_function(dev: &CudaDevice, op: Entry, d: DType) -> candle_core::Result<CudaFunction> {
    let t = dt(d).ok_or_else(|| candle_core::Error::Msg(format!("no CUDA kernel for {d:?}")))?;
    function(dev, Image::Fused, &images::fused_entry(op, t)).map_err(ce)
}

/// `(x + delta, rms_norm(x + delta) · w)` as one `[2, rows, dim]` output.
struct AddRmsNorm(f32);

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "tessera-cuda-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("a CUDA kernel")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        let dim = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / dim.max(1);
        let dev = xs.device().clone();
        let f = fused_function(&dev, Entry::AddRmsNorm, xs.dtype())?;
        let cfg =
            LaunchConfig { grid_dim: (u32_of(rows).map_err(ce)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (r, d, eps) = (u32_of(rows).map_err(ce)?, u32_of(dim).map_err(ce)?, self.0);
        by_dtype!(xs.dtype(), T => {
            // SAFETY: the kernel writes all 2·rows·dim outputs (sums, then normed rows).
            let mut out = unsafe { dev.alloc::<T>(2 * rows * dim)? };
            let (xv, dv, wv) = (view::<T>(xs, xl)?, view::<T>(ds, dl)?, view::<T>(ws, wl)?);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&mut out).arg(&xv).arg(&dv).arg(&wv).arg(&r).arg(&d).arg(&eps);
            // SAFETY: the arguments match the kernel's signature; every pointer covers its extent.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
            Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from((2, rows, dim))))
        })
    }
}

/// `silu(gate) · up` from the fused gate/up rows (the intermediate size).
struct SiluMul(usize);

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "tessera-cuda-silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("a CUDA kernel")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        let inter = self.0;
        let rows = l.shape().elem_count() / (2 * inter).max(1);
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inter;
        }
        let dev = s.device().clone();
        let f = fused_function(&dev, Entry::SiluMul, s.dtype())?;
        let (r, i) = (u32_of(rows).map_err(ce)?, u32_of(inter).map_err(ce)?);
        by_dtype!(s.dtype(), T => {
            // SAFETY: the kernel writes all rows·inter outputs.
            let mut out = unsafe { dev.alloc::<T>(rows * inter)? };
            let v = view::<T>(s, l)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&mut out).arg(&v).arg(&r).arg(&i);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(elementwise(rows * inter)) }.map_err(launch_err)?;
            Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(dims)))
        })
    }
}

/// Queries and keys rotated by their tokens' `cos`/`sin` rows: q' then k', flat.
struct Rotary<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    interleaved: bool,
}

impl CustomOp2 for Rotary<'_> {
    fn name(&self) -> &'static str {
        "tessera-cuda-rotary-qk"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("a CUDA kernel")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout) -> CResult<(CudaStorage, Shape)> {
        let (t, heads, d) = ql.shape().dims3()?;
        let (_, kv_heads, _) = kl.shape().dims3()?;
        let dev = qs.device().clone();
        let f = fused_function(&dev, Entry::RotaryQk, qs.dtype())?;
        let (gc, cl) = self.cos.storage_and_layout();
        let (gs, sl) = self.sin.storage_and_layout();
        let (Storage::Cuda(cs), Storage::Cuda(ss)) = (&*gc, &*gs) else {
            candle_core::bail!("rotary tables off the GPU")
        };
        let n = t * (heads + kv_heads) * d;
        let u = |v: usize| u32_of(v).map_err(ce);
        let args = [u(t)?, u(heads)?, u(kv_heads)?, u(d)?, u32::from(self.interleaved)];
        by_dtype!(qs.dtype(), T => {
            // SAFETY: the kernel writes every element of q' and k' (each pair of each row).
            let mut out = unsafe { dev.alloc::<T>(n)? };
            let (qv, kv) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?);
            let (cv, sv) = (view::<T>(cs, cl)?, view::<T>(ss, sl)?);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&mut out).arg(&qv).arg(&kv).arg(&cv).arg(&sv);
            for a in &args {
                b.arg(a);
            }
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(elementwise(n / 2)) }.map_err(launch_err)?;
            Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(n)))
        })
    }
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
        let slots = view::<u32>(ss, slots_l)?;
        let (a, _) = cl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("non-contiguous cache".into()))?;
        let (nn, rr) = (u32_of(n).map_err(err)?, u32_of(row_len).map_err(err)?);
        let stream = dev.cuda_stream();
        macro_rules! launch {
            ($C:ty, $S:ty) => {{
                let mut c = cache.as_cuda_slice_mut::<$C>()?.slice_mut(a..);
                let r = view::<$S>(rows, rl)?;
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

/// Paged attention of `q` over the caches through the step's packed block tables.
struct Attention<'a> {
    packed: &'a PackedTables,
    block_size: usize,
}

impl CustomOp3 for Attention<'_> {
    fn name(&self) -> &'static str {
        "tessera-cuda-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("a CUDA kernel")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        let (t, heads, d) = ql.shape().dims3()?;
        let kv_heads = kl.shape().dims()[1];
        let (Some(qd), Some(cd)) = (dt(qs.dtype()), dt(ks.dtype())) else {
            candle_core::bail!("no CUDA attention for {:?} over {:?}", qs.dtype(), ks.dtype())
        };
        let Some(name) = images::attention_entry(qd, cd, d) else {
            candle_core::bail!("no CUDA attention for head_dim {d}")
        };
        let dev = qs.device().clone();
        let f = function(&dev, Image::Attention, &name).map_err(ce)?;
        let p = self.packed;
        let (gt, tl) = p.tables.storage_and_layout();
        let (gs, sl) = p.seqs.storage_and_layout();
        let (gr, rl) = p.seq_of_row.storage_and_layout();
        let (Storage::Cuda(ts), Storage::Cuda(ss), Storage::Cuda(rs)) = (&*gt, &*gs, &*gr) else {
            candle_core::bail!("block tables off the GPU")
        };
        let u = |v: usize| u32_of(v).map_err(ce);
        let dims = [u(p.stride)?, u(heads)?, u(kv_heads)?, u(self.block_size)?];
        let scale = 1.0 / (d as f32).sqrt();
        let cfg = LaunchConfig { grid_dim: (u(t)?, u(heads)?, 1), block_dim: (u(d)?, 1, 1), shared_mem_bytes: 0 };
        by_dtype!(qs.dtype(), Q => {
            // SAFETY: one block per (row, head) writes each of its D outputs.
            let mut out = unsafe { dev.alloc::<Q>(t * heads * d)? };
            let qv = view::<Q>(qs, ql)?;
            let (tv, sv, rv) = (view::<u32>(ts, tl)?, view::<u32>(ss, sl)?, view::<u32>(rs, rl)?);
            let stream = dev.cuda_stream();
            by_dtype!(ks.dtype(), C => {
                let (kv, vv) = (view::<C>(ks, kl)?, view::<C>(vs, vl)?);
                let mut b = stream.launch_builder(&f);
                b.arg(&mut out).arg(&qv).arg(&kv).arg(&vv).arg(&tv).arg(&dims[0]).arg(&sv).arg(&rv);
                b.arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&scale);
                // SAFETY: the arguments match the kernel's signature; the caller checked the
                // tables against the caches' size.
                unsafe { b.launch(cfg) }.map_err(launch_err)?;
                Ok(())
            })?;
            Ok((Q::wrap_cuda_slice(out, dev.clone()), Shape::from((t, heads * d))))
        })
    }
}
