//! The quantized matrix product `y = x Wᵀ`: activations quantized once per call, output
//! columns split over the rayon pool (persistent, sized by the worker's `--threads`), each
//! task running the active instruction set's tile over its rows.

use rayon::prelude::*;

use crate::out::Out;
use crate::quant::kquant::as_blocks_32;
use crate::quant::packed::GROUP;
use crate::quant::{quantize_rows, quantize_rows_k, scalar, ActBlock, ActBlockK, QMatrix, QK};
use crate::{Isa, KernelError, Result};

/// Output rows per task: small enough to balance two to a few dozen threads, large enough
/// that a task's weights amortise its scheduling (a few µs).
fn chunk_rows(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    n.div_ceil(threads * 4).clamp(16, 512)
}

impl QMatrix {
    /// `out[m, rows] = x[m, cols] · selfᵀ` on the active instruction set.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_on(Isa::active(), x, m, out)
    }

    /// [`QMatrix::matmul`] into uninitialised memory: on success every one of the `m × rows`
    /// outputs is written (callers may then treat them as initialised).
    pub fn matmul_uninit(&self, x: &[f32], m: usize, out: &mut [std::mem::MaybeUninit<f32>]) -> Result<()> {
        self.matmul_raw(Isa::active(), x, m, out.as_mut_ptr().cast(), out.len())
    }

    /// [`QMatrix::matmul`] on a chosen instruction set (tests compare each with the reference).
    pub fn matmul_on(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_raw(isa, x, m, out.as_mut_ptr(), out.len())
    }

    /// The product into `len` cells at `out`, each written exactly once (never read).
    fn matmul_raw(&self, isa: Isa, x: &[f32], m: usize, out: *mut f32, len: usize) -> Result<()> {
        let (n, k) = (self.rows(), self.cols());
        if x.len() != m * k || len != m * n {
            return Err(KernelError::Shape(format!(
                "matmul of [{m}, {k}] by [{n}, {k}]ᵀ: input holds {} values, output {}",
                x.len(),
                len
            )));
        }
        isa.ensure_available()?;
        let ty = self.qtype();
        let ptr = Out(out);
        if let (Some(p), Some(gemm)) = (self.packed(), packed_gemm(isa, ty)) {
            // Q4_K's packed form takes its Q8_K activations as blocks of 32.
            let acts = if ty.is_k() { as_blocks_32(&quantize_rows_k(x, k)) } else { quantize_rows(x, k) };
            // An even number of groups per task, so the 512-bit kernel can take them in pairs.
            split(p.groups, (chunk_rows(n) / GROUP).max(1).next_multiple_of(2), |groups| {
                // SAFETY: `packed_gemm` chose a path this CPU has for this type; each task
                // writes only its groups' columns, and the chunks are disjoint.
                unsafe { gemm(p, ty, groups, &acts, k / QK, ptr.at(0), n) };
            });
            return Ok(());
        }
        let blocks = k / ty.block_elems();
        let acts = if ty.is_k() { Acts::K(quantize_rows_k(x, k)) } else { Acts::Q8(quantize_rows(x, k)) };
        split(n, chunk_rows(n), |rows| {
            // SAFETY: each task writes only the columns `rows` of every output row, and the
            // chunks are disjoint; `out` outlives the parallel loop.
            let mut put = |i: usize, j: usize, v: f32| unsafe { *ptr.at(i * n + j) = v };
            match &acts {
                Acts::Q8(a) => tile(isa, self, rows, a, blocks, &mut put),
                Acts::K(a) => tile_k(isa, self, rows, a, blocks, &mut put),
            }
        });
        Ok(())
    }
}

/// `run` over `0..total` in chunks of `chunk`, on the pool when there is more than one.
fn split(total: usize, chunk: usize, run: impl Fn(std::ops::Range<usize>) + Sync) {
    let part = |c: usize| run(c * chunk..((c + 1) * chunk).min(total));
    match total.div_ceil(chunk) {
        0 | 1 => part(0),
        chunks => (0..chunks).into_par_iter().for_each(part),
    }
}

type PackedGemm =
    unsafe fn(&crate::quant::packed::Packed, crate::QType, std::ops::Range<usize>, &[ActBlock], usize, *mut f32, usize);

/// The packed GEMM for `ty` on `isa`, if there is one (Q8_0's needs VNNI).
fn packed_gemm(isa: Isa, ty: crate::QType) -> Option<PackedGemm> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if ty != crate::QType::Q8_0 => Some(crate::quant::x86_packed::avx2::gemm),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => Some(crate::quant::x86_packed::avxvnni::gemm),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => Some(crate::quant::x86_packed512::gemm),
        _ => None,
    }
}

/// The activations quantized for the weight's type: Q8_0/Q8_1 blocks, or Q8_K super-blocks.
enum Acts {
    Q8(Vec<ActBlock>),
    K(Vec<ActBlockK>),
}

fn tile_k(
    isa: Isa,
    w: &QMatrix,
    rows: std::ops::Range<usize>,
    acts: &[ActBlockK],
    blocks: usize,
    put: &mut dyn FnMut(usize, usize, f32),
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_on` checked that the CPU has this instruction set.
        Isa::Avx2 => unsafe { crate::quant::x86_k::avx2::tile(w, rows, acts, blocks, put) },
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => unsafe { crate::quant::x86_k::avxvnni::tile(w, rows, acts, blocks, put) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { crate::quant::x86_k::vnni::tile(w, rows, acts, blocks, put) },
        _ => scalar::dot_tile_k(w, rows, acts, blocks, put),
    }
}

fn tile(
    isa: Isa,
    w: &QMatrix,
    rows: std::ops::Range<usize>,
    acts: &[ActBlock],
    blocks: usize,
    put: &mut dyn FnMut(usize, usize, f32),
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_on` checked that the CPU has this instruction set.
        Isa::Avx2 => unsafe { crate::quant::x86::avx2::tile(w, rows, acts, blocks, put) },
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => unsafe { crate::quant::x86::avxvnni::tile(w, rows, acts, blocks, put) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { crate::quant::x86::vnni::tile(w, rows, acts, blocks, put) },
        _ => scalar::dot_tile(w, rows, acts, blocks, put),
    }
}

#[cfg(test)]
mod tests;
