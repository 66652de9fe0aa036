//! GGUF block-quantized weights and the activation blocks they are multiplied with.
//!
//! A [`QMatrix`] keeps ggml's byte layout unchanged (rows of blocks), so a file's tensor or a
//! rank's block-exact shard of it is used as is. Activations are quantized once per call
//! into [`ActBlock`]s with ggml's rules (Q8_0, and Q8_1's pre-scaled sum for the types with
//! a minimum), and the products are integer dot products per block, scaled in f32.

pub(crate) mod kquant;
pub(crate) mod packed;
pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_k;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_packed;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_packed512;

pub use kquant::{quantize_row_k, quantize_rows_k, ActBlockK, QK_K};

use half::f16;

use crate::{KernelError, Result};

/// Elements per block of the 32-element types.
pub const QK: usize = 32;

/// A GGUF weight type these kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QType {
    /// Bytes of one block of [`QK`] elements.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Weights per block: 32, or 256 for the K-quants' super-blocks.
    pub fn block_elems(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            QK
        }
    }

    /// Whether this is a K-quant (activations in Q8_K super-blocks).
    pub fn is_k(self) -> bool {
        matches!(self, QType::Q4K | QType::Q5K | QType::Q6K)
    }

    /// The type of a GGML type name (`q4_0`, `Q4_1`, ...), if these kernels have it.
    pub fn from_name(name: &str) -> Option<QType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "q4_0" => QType::Q4_0,
            "q4_1" => QType::Q4_1,
            "q5_0" => QType::Q5_0,
            "q5_1" => QType::Q5_1,
            "q8_0" => QType::Q8_0,
            "q4_k" => QType::Q4K,
            "q5_k" => QType::Q5K,
            "q6_k" => QType::Q6K,
            _ => return None,
        })
    }

    /// Whether the activations need Q8_1's scaled sum (types with a per-block minimum).
    pub(crate) fn has_min(self) -> bool {
        matches!(self, QType::Q4_1 | QType::Q5_1)
    }
}

/// One quantized block of 32 activations: ggml's Q8_0 (`d`, `qs`) with Q8_1's `s = d·Σqs`
/// (computed from the unrounded scale and rounded through f16, as ggml does) and the
/// integer sum, so one quantization serves every weight type.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
pub struct ActBlock {
    pub qs: [i8; QK],
    /// The scale, rounded through f16 as ggml stores it.
    pub d: f32,
    /// `d · Σ qs` rounded through f16 (ggml's Q8_1 `s`).
    pub s: f32,
    /// `Σ qs`.
    pub isum: i32,
}

/// Quantize one row (`x.len()` a multiple of 32) into `out` (one block per 32 values), with
/// ggml's `quantize_row_q8_0/q8_1` rules: `d = max|x| / 127`, `q = round(x / d)` (half away
/// from zero), `d` stored as f16.
pub fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::active() != crate::Isa::Scalar {
        // SAFETY: a SIMD path is active, so the CPU has AVX2+FMA+F16C.
        unsafe { quantize_row_avx2(x, out) };
        return;
    }
    quantize_row_body(x, out)
}

/// The same arithmetic in AVX2: four vectors a block, `round` as `trunc(v + copysign(0.5⁻, v))`
/// (exactly `roundf`, as the compiler lowers it), f16 through F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_avx2(x: &[f32], out: &mut [ActBlock]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let below_half = _mm256_set1_ps(0.49999997);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let f16_round = |v: f32| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v))));
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = xs.as_ptr();
        let v = [0, 1, 2, 3].map(|i| _mm256_loadu_ps(p.add(8 * i)));
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|v| {
            let t = _mm256_mul_ps(v, id);
            let t = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), below_half));
            _mm256_cvttps_epi32(t)
        });
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, _mm256_permutevar8x32_epi32(packed, order));
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<1>(s)));
        b.d = f16_round(d);
        b.s = f16_round(sum as f32 * d);
        b.isum = sum;
    }
}

#[inline(always)]
fn quantize_row_body(x: &[f32], out: &mut [ActBlock]) {
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // Eight lanes of maxima (vectorises; a single running maximum would not).
        let mut lanes = [0f32; 8];
        for c in xs.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
        b.isum = sum;
    }
}

/// `m` rows of `k` activations quantized: `m × k/32` blocks, row-major (rows split over the
/// pool when there are many).
pub fn quantize_rows(x: &[f32], k: usize) -> Vec<ActBlock> {
    use rayon::prelude::*;
    let n = x.len() / QK;
    let mut out: Vec<ActBlock> = Vec::with_capacity(n);
    // SAFETY: all-zero bytes are a valid `ActBlock` (integers and +0.0), and one memset is
    // far cheaper than cloning a blank block `n` times; every block is overwritten below.
    unsafe {
        std::ptr::write_bytes(out.as_mut_ptr(), 0, n);
        out.set_len(n);
    }
    let per = k / QK;
    if x.len() / k >= 16 {
        out.par_chunks_mut(per * 8).zip(x.par_chunks(k * 8)).for_each(|(o, xs)| {
            for (row, o) in xs.chunks_exact(k).zip(o.chunks_exact_mut(per)) {
                quantize_row(row, o);
            }
        });
    } else {
        for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(per)) {
            quantize_row(row, o);
        }
    }
    out
}

/// A row-major matrix of `rows × cols` weights in one GGUF block type (`rows` outputs,
/// `cols` inputs), in ggml's byte layout.
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// The SIMD GEMM's layout of the same weights, where the CPU has SIMD and the type one.
    packed: Option<packed::Packed>,
}

impl QMatrix {
    /// Wrap ggml block bytes; `cols` must be a multiple of the type's block (32, or 256 for
    /// the K-quants) and `data` exactly the blocks.
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let be = ty.block_elems();
        if !cols.is_multiple_of(be) {
            return Err(KernelError::Shape(format!("{ty:?}: {cols} columns are not a multiple of {be}")));
        }
        let want = rows * cols / be * ty.block_bytes();
        if data.len() != want {
            return Err(KernelError::Shape(format!(
                "{ty:?} [{rows}, {cols}]: {} bytes of blocks, expected {want}",
                data.len()
            )));
        }
        let simd = crate::Isa::available().len() > 1;
        let packed = (simd && packed::packable(ty)).then(|| {
            let n = cols / be * ty.block_bytes();
            packed::pack(ty, rows, cols, |r| &data[r * n..(r + 1) * n])
        });
        Ok(Self { ty, rows, cols, data, packed })
    }

    /// The packed layout, if this matrix has one.
    pub(crate) fn packed(&self) -> Option<&packed::Packed> {
        self.packed.as_ref()
    }

    /// Stack matrices with the same type and columns (fusing projections that share an input).
    pub fn concat_rows(parts: &[&QMatrix]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| KernelError::Shape("nothing to concatenate".into()))?;
        if let Some(p) = parts.iter().find(|p| p.ty != first.ty || p.cols != first.cols) {
            return Err(KernelError::Shape(format!(
                "cannot stack {:?} [{}, {}] under {:?} [{}, {}]",
                p.ty, p.rows, p.cols, first.ty, first.rows, first.cols
            )));
        }
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Self::new(first.ty, parts.iter().map(|p| p.rows).sum(), first.cols, data)
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes of output row `r`.
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        let n = self.cols / self.ty.block_elems() * self.ty.block_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` as f32 (for tests and references).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        if self.ty.is_k() {
            kquant::dequantize_k(self.ty, self.row(r))
        } else {
            scalar::dequantize(self.ty, self.row(r))
        }
    }
}

/// Read an f16 stored little-endian at `b[at..at + 2]`.
#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 quantizer equals the plain body to the bit: codes, scales, sums, including
    /// halves (which round away from zero), zero blocks and a wide range of magnitudes.
    #[test]
    fn simd_activation_quantization_equals_the_reference() {
        #[cfg(target_arch = "x86_64")]
        if crate::Isa::available().contains(&crate::Isa::Avx2) {
            let mut seed = 7u64;
            let mut x: Vec<f32> = (0..QK * 64)
                .map(|i| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    u * 10f32.powi((i / QK) as i32 % 9 - 4)
                })
                .collect();
            x[..QK].fill(0.0);
            for (i, v) in x[QK..2 * QK].iter_mut().enumerate() {
                // amax 127 → d = 1: every other value is an exact half.
                *v = if i == 0 { 127.0 } else { i as f32 - 16.5 };
            }
            let blank = ActBlock { qs: [0; QK], d: 0.0, s: 0.0, isum: 0 };
            let (mut want, mut got) = (vec![blank; 64], vec![blank; 64]);
            quantize_row_body(&x, &mut want);
            // SAFETY: the CPU has AVX2 (checked above).
            unsafe { quantize_row_avx2(&x, &mut got) };
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(
                    (w.qs, w.d.to_bits(), w.s.to_bits(), w.isum),
                    (g.qs, g.d.to_bits(), g.s.to_bits(), g.isum),
                    "block {i}"
                );
            }
        }
    }
}
