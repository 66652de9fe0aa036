//! Fused kernels, each checked against its device-generic reference (plain candle ops) before
//! it is used. [`Kernels::check`] runs every candidate and the reference on the same seeded
//! random inputs of the served shapes on the serving device and compares them within
//! [`tolerance`] for the dtype. A candidate that disagrees, errors or panics is not used: that
//! op runs the reference, and its [`KernelReport`] says so and why (the start-up log and the
//! `tessera:kernel_path` metric show it). Under tensor parallelism the ranks then vote
//! ([`Kernels::agree`]): an op runs fused only if it passed on every rank of the group, so
//! replicated arithmetic stays identical across ranks.
//!
//! Candidates: the CPU's kernels ([`cpu::CpuFused`], over `tessera-kernels`) and, with the
//! `cuda` feature, the CUDA kernels of `kernels/cuda` as candle custom ops (`cuda::CudaFused`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::attention::StepTables;
use crate::parallel::TensorParallel;
use crate::{ModelError, Result};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod inputs;
pub mod reference;

pub use inputs::ServedShapes;

/// An op with a fused implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedOp {
    /// `(x + delta, rms_norm(x + delta) · w)`.
    AddRmsNorm,
    /// `silu(gate) · up` from the fused gate/up output `[.., 2·inter]`.
    SiluMul,
    /// Rotary embedding of the step's queries and keys at their positions.
    Rotary,
    /// The step's keys and values into their cache slots (reshape-and-cache).
    CacheWrite,
    /// Attention of the step's queries over the paged cache (decode and prefill).
    PagedAttention,
}

impl FusedOp {
    pub const ALL: [FusedOp; 5] =
        [FusedOp::AddRmsNorm, FusedOp::SiluMul, FusedOp::Rotary, FusedOp::CacheWrite, FusedOp::PagedAttention];

    pub fn as_str(self) -> &'static str {
        match self {
            FusedOp::AddRmsNorm => "add_rms_norm",
            FusedOp::SiluMul => "silu_mul",
            FusedOp::Rotary => "rotary",
            FusedOp::CacheWrite => "cache_write",
            FusedOp::PagedAttention => "paged_attention",
        }
    }
}

/// One op's inputs.
#[derive(Clone, Copy)]
pub enum OpArgs<'a> {
    AddRmsNorm {
        x: &'a Tensor,
        delta: &'a Tensor,
        w: &'a Tensor,
        eps: f32,
    },
    SiluMul {
        gu: &'a Tensor,
        inter: usize,
    },
    /// `q` `[T, heads, D]`, `k` `[T, kv_heads, D]`, `cos`/`sin` `[T, D/2]` (each token's rows).
    Rotary {
        q: &'a Tensor,
        k: &'a Tensor,
        cos: &'a Tensor,
        sin: &'a Tensor,
        interleaved: bool,
    },
    /// `k`, `v` `[T, kv_heads, D]` into the caches `[slots, kv_heads, D]` in place.
    CacheWrite {
        k_cache: &'a Tensor,
        v_cache: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        step: &'a StepTables<'a>,
    },
    /// `q` `[T, heads, D]` over caches that already hold the step's keys/values; with a
    /// `window`, each query sees only its last `window` positions.
    PagedAttention {
        q: &'a Tensor,
        k_cache: &'a Tensor,
        v_cache: &'a Tensor,
        step: &'a StepTables<'a>,
        window: Option<usize>,
    },
}

impl OpArgs<'_> {
    pub fn op(&self) -> FusedOp {
        match self {
            OpArgs::AddRmsNorm { .. } => FusedOp::AddRmsNorm,
            OpArgs::SiluMul { .. } => FusedOp::SiluMul,
            OpArgs::Rotary { .. } => FusedOp::Rotary,
            OpArgs::CacheWrite { .. } => FusedOp::CacheWrite,
            OpArgs::PagedAttention { .. } => FusedOp::PagedAttention,
        }
    }
}

/// A fused implementation of one op. Its outputs are the reference's, in the same order:
/// `[sum, normed]`, `[out]`, `[q, k]`, the two caches after the write, `[out]`.
pub trait FusedKernel: Send + Sync {
    fn op(&self) -> FusedOp;
    fn name(&self) -> &'static str;
    /// Whether it takes these inputs (device, dtypes, layout, shapes); the reference runs otherwise.
    fn supports(&self, args: &OpArgs) -> bool;
    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>>;
}

/// What the check decided for one op.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelReport {
    pub op: FusedOp,
    /// The candidate checked (`"none"` when there was none).
    pub kernel: &'static str,
    /// Whether the fused kernel is used.
    pub fused: bool,
    /// `passed (max error …)`, `mismatch: …`, `failed: …`, `unsupported`, `no fused kernel`,
    /// `refused by the group: …`.
    pub reason: String,
}

/// `(atol, rtol)` for comparing a fused output with the reference's in `dtype`.
pub fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F16 => (4e-3, 4e-3),
        DType::BF16 => (2e-2, 2e-2),
        _ => (1e-5, 1e-4),
    }
}

/// Fused kernels chosen per op, or the reference.
#[derive(Clone, Default)]
pub struct Kernels {
    chosen: Vec<Arc<dyn FusedKernel>>,
    reports: Vec<KernelReport>,
    /// The (activation, cache) dtypes and block size the check ran with.
    checked: Option<(DType, DType, usize)>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("reports", &self.reports).finish()
    }
}

/// The largest `|fused − reference|` over `atol + rtol·|reference|` (≤ 1 passes), and where.
fn excess(fused: &Tensor, reference: &Tensor, tol: (f32, f32)) -> Result<(f32, f32, usize)> {
    if fused.dims() != reference.dims() {
        return Err(ModelError::Config(format!("shape {:?}, reference {:?}", fused.dims(), reference.dims())));
    }
    let f: Vec<f32> = fused.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let r: Vec<f32> = reference.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let (mut worst, mut err, mut at) = (0f32, 0f32, 0);
    for (i, (a, b)) in f.iter().zip(&r).enumerate() {
        let e = (a - b).abs();
        let ratio = if e.is_nan() { f32::INFINITY } else { e / (tol.0 + tol.1 * b.abs()) };
        if ratio > worst {
            (worst, err, at) = (ratio, e, i);
        }
    }
    Ok((worst, err, at))
}

/// Run `k` and the reference on the check's inputs for its op: the verdict as a reason.
fn verdict(k: &dyn FusedKernel, device: &Device, dtypes: (DType, DType), shapes: &ServedShapes) -> Result<String> {
    // The looser of the two types' tolerances (a cache may be narrower than the activations).
    let (a, c) = (tolerance(dtypes.0), tolerance(dtypes.1));
    let tol = (a.0.max(c.0), a.1.max(c.1));
    let mut worst = (0f32, 0f32);
    for rows in [1, 7, 33] {
        // Each side gets its own inputs (the cache write is in place).
        let mine = inputs::Inputs::new(k.op(), shapes, rows, device, dtypes)?;
        let theirs = inputs::Inputs::new(k.op(), shapes, rows, device, dtypes)?;
        let (mine_step, theirs_step) = (mine.step(), theirs.step());
        let (args, want_args) = (mine.args(mine_step.as_ref())?, theirs.args(theirs_step.as_ref())?);
        if !k.supports(&args) {
            return Ok("unsupported".into());
        }
        let (fused, want) = (k.run(&args)?, reference::run(&want_args)?);
        if fused.len() != want.len() {
            return Ok(format!("mismatch: {} outputs, reference {}", fused.len(), want.len()));
        }
        for (j, (f, r)) in fused.iter().zip(&want).enumerate() {
            let (ratio, err, at) = excess(f, r, tol)?;
            if ratio > 1.0 {
                return Ok(format!(
                    "mismatch: output {j} element {at} of {:?} differs by {err} (tolerance {} + {}·|ref|)",
                    r.dims(),
                    tol.0,
                    tol.1
                ));
            }
            worst = (worst.0.max(ratio), worst.1.max(err));
        }
    }
    Ok(format!("passed (max error {:.3e}, {:.2} of the tolerance)", worst.1, worst.0))
}

impl Kernels {
    /// Every op on its reference.
    pub fn reference() -> Kernels {
        Kernels::default()
    }

    /// The fused candidates for `device`: the CPU's, or (with the `cuda` feature) the GPU's.
    pub fn candidates(device: &Device) -> Vec<Arc<dyn FusedKernel>> {
        match device {
            Device::Cpu => cpu::candidates(),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => cuda::candidates(),
            _ => vec![],
        }
    }

    /// Check each candidate against the reference on `device` with activations of `dtype`
    /// and a cache of `cache_dtype` at `shapes` (1, 7 and 33 rows), keeping those that agree.
    pub fn check(
        candidates: Vec<Arc<dyn FusedKernel>>,
        device: &Device,
        dtype: DType,
        cache_dtype: DType,
        shapes: ServedShapes,
    ) -> Kernels {
        let mut out = Kernels { checked: Some((dtype, cache_dtype, shapes.block_size)), ..Kernels::default() };
        for op in FusedOp::ALL {
            let Some(k) = candidates.iter().find(|k| k.op() == op) else {
                out.reports.push(KernelReport { op, kernel: "none", fused: false, reason: "no fused kernel".into() });
                continue;
            };
            let run = std::panic::AssertUnwindSafe(|| verdict(k.as_ref(), device, (dtype, cache_dtype), &shapes));
            let reason = match std::panic::catch_unwind(run) {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "failed: the kernel panicked".into(),
            };
            let fused = reason.starts_with("passed");
            if fused {
                out.chosen.push(k.clone());
            }
            out.reports.push(KernelReport { op, kernel: k.name(), fused, reason });
        }
        out
    }

    /// The dtypes (activations, cache) and block size of the last check, if any.
    pub fn checked(&self) -> Option<(DType, DType, usize)> {
        self.checked
    }

    /// The ranks of `tp` vote: an op stays fused only where it passed on every rank (a
    /// collective: every rank of the group calls it after its own check).
    pub fn agree(mut self, tp: &TensorParallel, device: &Device) -> Result<Kernels> {
        let world = tp.world();
        if world == 1 {
            return Ok(self);
        }
        let mine: Vec<f32> = FusedOp::ALL.iter().map(|&op| f32::from(u8::from(self.is_fused(op)))).collect();
        let votes: Vec<f32> = tp.all_reduce(&Tensor::from_vec(mine, FusedOp::ALL.len(), device)?)?.to_vec1()?;
        for (op, passed) in FusedOp::ALL.iter().zip(votes) {
            let passed = passed.round() as usize;
            if passed == world || !self.is_fused(*op) {
                continue;
            }
            self.chosen.retain(|k| k.op() != *op);
            for r in self.reports.iter_mut().filter(|r| r.op == *op) {
                r.fused = false;
                r.reason = format!("refused by the group: passed on {passed} of {world} tensor-parallel ranks");
            }
        }
        Ok(self)
    }

    fn is_fused(&self, op: FusedOp) -> bool {
        self.chosen.iter().any(|k| k.op() == op)
    }

    /// What the check decided, one report per op.
    pub fn reports(&self) -> &[KernelReport] {
        &self.reports
    }

    /// Run `args` on its checked fused kernel when it takes them, else on the reference.
    pub fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>> {
        match self.chosen.iter().find(|k| k.op() == args.op()) {
            Some(k) if k.supports(args) => k.run(args),
            _ => reference::run(args),
        }
    }

    fn outputs<const N: usize>(&self, args: &OpArgs) -> Result<[Tensor; N]> {
        let out = self.run(args)?;
        let n = out.len();
        out.try_into().map_err(|_| ModelError::Config(format!("{} returned {n} outputs, not {N}", args.op().as_str())))
    }

    pub fn add_rms_norm(&self, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let [sum, normed] = self.outputs(&OpArgs::AddRmsNorm { x, delta, w, eps })?;
        Ok((sum, normed))
    }

    pub fn silu_mul(&self, gu: &Tensor, inter: usize) -> Result<Tensor> {
        let [out] = self.outputs(&OpArgs::SiluMul { gu, inter })?;
        Ok(out)
    }

    pub fn rotary(
        &self,
        q: &Tensor,
        k: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        interleaved: bool,
    ) -> Result<(Tensor, Tensor)> {
        let [q, k] = self.outputs(&OpArgs::Rotary { q, k, cos, sin, interleaved })?;
        Ok((q, k))
    }

    pub fn cache_write(
        &self,
        k_cache: &Tensor,
        v_cache: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &StepTables,
    ) -> Result<()> {
        let [_, _] = self.outputs(&OpArgs::CacheWrite { k_cache, v_cache, k, v, step })?;
        Ok(())
    }

    /// `[T, heads · head_dim]`; with a `window`, each query sees its last `window` positions.
    pub fn paged_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        step: &StepTables,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let [out] = self.outputs(&OpArgs::PagedAttention { q, k_cache, v_cache, step, window })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
