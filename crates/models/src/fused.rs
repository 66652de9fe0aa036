//! Fused kernels, each checked against its device-generic reference (plain candle ops) before
//! it is used. [`Kernels::check`] runs every candidate and the reference on the same seeded
//! random inputs of the served shapes on the serving device. It compares them within
//! [`tolerance`] for the dtype. A candidate that disagrees, errors or panics is not used: that
//! op runs the reference, and its [`KernelReport`] says so and why (the start-up log and the
//! worker's reports show it). The CPU's fused ops ([`CpuFused`], over `tessera-kernels`) are the
//! first candidates. The CUDA kernels (`tessera_kernels::cuda`) plug in the same way once
//! wrapped as candle custom ops.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::layers::{kernel_err, with_cpu_f32};
use crate::{ModelError, Result};

/// An op with a fused implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedOp {
    /// `(x + delta, rms_norm(x + delta) · w)`.
    AddRmsNorm,
    /// `silu(gate) · up` from the fused gate/up output `[.., 2·inter]`.
    SiluMul,
}

impl FusedOp {
    pub const ALL: [FusedOp; 2] = [FusedOp::AddRmsNorm, FusedOp::SiluMul];

    pub fn as_str(self) -> &'static str {
        match self {
            FusedOp::AddRmsNorm => "add_rms_norm",
            FusedOp::SiluMul => "silu_mul",
        }
    }
}

/// One op's inputs.
#[derive(Debug, Clone, Copy)]
pub enum OpArgs<'a> {
    AddRmsNorm { x: &'a Tensor, delta: &'a Tensor, w: &'a Tensor, eps: f32 },
    SiluMul { gu: &'a Tensor, inter: usize },
}

impl OpArgs<'_> {
    fn op(&self) -> FusedOp {
        match self {
            OpArgs::AddRmsNorm { .. } => FusedOp::AddRmsNorm,
            OpArgs::SiluMul { .. } => FusedOp::SiluMul,
        }
    }
}

/// A fused implementation of one op.
pub trait FusedKernel: Send + Sync {
    fn op(&self) -> FusedOp;
    fn name(&self) -> &'static str;
    /// Whether it takes these inputs (device, dtype, layout); the reference runs otherwise.
    fn supports(&self, args: &OpArgs) -> bool;
    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>>;
}

/// The device-generic references: candle ops only, on any device and dtype.
pub mod reference {
    use super::*;

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

    pub(super) fn run(args: &OpArgs) -> Result<Vec<Tensor>> {
        match *args {
            OpArgs::AddRmsNorm { x, delta, w, eps } => {
                let (a, b) = add_rms_norm(x, delta, w, eps)?;
                Ok(vec![a, b])
            }
            OpArgs::SiluMul { gu, inter } => Ok(vec![silu_mul(gu, inter)?]),
        }
    }
}

/// The CPU's fused ops (`tessera_kernels::add_rms_norm`, `silu_mul`): f32, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct CpuFused(pub FusedOp);

impl FusedKernel for CpuFused {
    fn op(&self) -> FusedOp {
        self.0
    }

    fn name(&self) -> &'static str {
        match self.0 {
            FusedOp::AddRmsNorm => "cpu_add_rms_norm",
            FusedOp::SiluMul => "cpu_silu_mul",
        }
    }

    fn supports(&self, args: &OpArgs) -> bool {
        let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
        match *args {
            OpArgs::AddRmsNorm { x, delta, w, .. } => ok(x) && ok(delta) && ok(w) && x.dims() == delta.dims(),
            OpArgs::SiluMul { gu, inter } => ok(gu) && gu.dims().last() == Some(&(2 * inter)),
        }
    }

    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>> {
        let isa = tessera_kernels::Isa::active();
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
        }
    }
}

/// The shapes a model serves, for the check's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ServedShapes {
    pub hidden: usize,
    pub inter: usize,
    pub eps: f32,
}

/// What the check decided for one op.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelReport {
    pub op: FusedOp,
    /// The candidate checked (`"none"` when there was none).
    pub kernel: &'static str,
    /// Whether the fused kernel is used.
    pub fused: bool,
    /// `passed (max error …)`, `mismatch: …`, `failed: …`, `unsupported`, `no fused kernel`.
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
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("reports", &self.reports).finish()
    }
}

/// The inputs of the check for `op`: seeded uniform values in [-2, 2) at the served shapes.
fn inputs(op: FusedOp, s: ServedShapes, rows: usize, device: &Device, dtype: DType) -> Result<Vec<Tensor>> {
    let rand = |n: usize, salt: u64| -> Result<Tensor> {
        // A fixed LCG: the same inputs on every start-up and every device.
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Ok(Tensor::from_vec(v, n, device)?.to_dtype(dtype)?)
    };
    Ok(match op {
        FusedOp::AddRmsNorm => vec![
            rand(rows * s.hidden, 1)?.reshape((rows, s.hidden))?,
            rand(rows * s.hidden, 2)?.reshape((rows, s.hidden))?,
            rand(s.hidden, 3)?,
        ],
        FusedOp::SiluMul => vec![rand(rows * 2 * s.inter, 4)?.reshape((rows, 2 * s.inter))?],
    })
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

impl Kernels {
    /// Every op on its reference.
    pub fn reference() -> Kernels {
        Kernels::default()
    }

    /// The fused candidates for `device` (today the CPU's).
    pub fn candidates(device: &Device) -> Vec<Arc<dyn FusedKernel>> {
        match device {
            Device::Cpu => FusedOp::ALL.iter().map(|&op| Arc::new(CpuFused(op)) as Arc<dyn FusedKernel>).collect(),
            _ => vec![],
        }
    }

    /// Check each candidate against the reference on `device` in `dtype` at `shapes` (rows 1,
    /// 7 and 33), keeping those that agree.
    pub fn check(
        candidates: Vec<Arc<dyn FusedKernel>>,
        device: &Device,
        dtype: DType,
        shapes: ServedShapes,
    ) -> Kernels {
        let tol = tolerance(dtype);
        let mut out = Kernels::default();
        for op in FusedOp::ALL {
            let Some(k) = candidates.iter().find(|k| k.op() == op) else {
                out.reports.push(KernelReport { op, kernel: "none", fused: false, reason: "no fused kernel".into() });
                continue;
            };
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<String> {
                let mut worst = (0f32, 0f32);
                for rows in [1, 7, 33] {
                    let t = inputs(op, shapes, rows, device, dtype)?;
                    let args = match op {
                        FusedOp::AddRmsNorm => OpArgs::AddRmsNorm { x: &t[0], delta: &t[1], w: &t[2], eps: shapes.eps },
                        FusedOp::SiluMul => OpArgs::SiluMul { gu: &t[0], inter: shapes.inter },
                    };
                    if !k.supports(&args) {
                        return Ok("unsupported".into());
                    }
                    let (fused, want) = (k.run(&args)?, reference::run(&args)?);
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
            }));
            let reason = match verdict {
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

    pub fn add_rms_norm(&self, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let mut out = self.run(&OpArgs::AddRmsNorm { x, delta, w, eps })?.into_iter();
        match (out.next(), out.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(ModelError::Config("add_rms_norm returned fewer than 2 outputs".into())),
        }
    }

    pub fn silu_mul(&self, gu: &Tensor, inter: usize) -> Result<Tensor> {
        self.run(&OpArgs::SiluMul { gu, inter })?
            .pop()
            .ok_or_else(|| ModelError::Config("silu_mul returned no output".into()))
    }
}

#[cfg(test)]
mod tests;
