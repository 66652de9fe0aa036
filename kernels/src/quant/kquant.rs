//! ggml's K-quants (Q4_K, Q5_K, Q6_K): super-blocks of 256 weights with 6- or 8-bit
//! sub-block scales, multiplied with activations quantized to Q8_K (one f32 scale per 256
//! values and the sums of every 16 codes).
//!
//! The scalar reference decodes every type to one normal form ([`KBlock`]): integer codes,
//! an integer scale and minimum per 16 values, and the two f16 super-scales, so that
//! `value = d·scale·code − dmin·min`. The dot product is integer per super-block and scaled
//! once in f32, as ggml's `vec_dot_q*_K_q8_K`.

use super::{f16_at, QType};

/// Values per super-block.
pub const QK_K: usize = 256;

/// One super-block of 256 activations in ggml's Q8_K: `x ≈ d·qs`, `bsums[g] = Σ qs[16g..16g+16]`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlockK {
    pub qs: [i8; QK_K],
    pub d: f32,
    pub bsums: [i16; QK_K / 16],
}

impl ActBlockK {
    pub const ZERO: ActBlockK = ActBlockK { qs: [0; QK_K], d: 0.0, bsums: [0; QK_K / 16] };
}

/// ggml's `nearest_int`: round to nearest, ties to even (the float-magic trick).
#[inline]
fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0;
    ((t.to_bits() & 0x007f_ffff) as i32) - 0x0040_0000
}

/// Quantize one row (`x.len()` a multiple of 256) with ggml's `quantize_row_q8_K_ref`: the
/// scale comes from the value of largest magnitude (`iscale = −127/max`), codes round to
/// nearest-even and are capped at 127, `d = 1/iscale` stays f32.
pub fn quantize_row_k(x: &[f32], out: &mut [ActBlockK]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *b = ActBlockK::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// `m` rows of `k` activations as Q8_K: `m × k/256` super-blocks, row-major.
pub fn quantize_rows_k(x: &[f32], k: usize) -> Vec<ActBlockK> {
    let mut out = vec![ActBlockK::ZERO; x.len() / QK_K];
    for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(k / QK_K)) {
        quantize_row_k(row, o);
    }
    out
}

/// Q8_K super-blocks as blocks of 32 (same codes and scale; `s = d·Σq` exact in f32, not
/// rounded through f16), for the packed GEMM.
pub(crate) fn as_blocks_32(acts: &[ActBlockK]) -> Vec<super::ActBlock> {
    let mut out = Vec::with_capacity(acts.len() * 8);
    for a in acts {
        for sub in 0..QK_K / 32 {
            let mut qs = [0i8; 32];
            qs.copy_from_slice(&a.qs[32 * sub..32 * sub + 32]);
            let isum = a.bsums[2 * sub] as i32 + a.bsums[2 * sub + 1] as i32;
            out.push(super::ActBlock { qs, d: a.d, s: a.d * isum as f32, isum });
        }
    }
    out
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` (of 8) packed in
/// 12 bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// A super-block in normal form: `value[e] = d·scale[e/16]·code[e] − dmin·min[e/16]`.
struct KBlock {
    code: [i32; QK_K],
    scale: [i32; 16],
    min: [i32; 16],
    d: f32,
    dmin: f32,
}

fn decode(ty: QType, b: &[u8]) -> KBlock {
    let mut k = KBlock { code: [0; QK_K], scale: [0; 16], min: [0; 16], d: 0.0, dmin: 0.0 };
    match ty {
        QType::Q4K | QType::Q5K => {
            k.d = f16_at(b, 0);
            k.dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let (qh, qs) = if ty == QType::Q4K { (None, &b[16..144]) } else { (Some(&b[16..48]), &b[48..176]) };
            for j in 0..QK_K / 64 {
                for half in 0..2 {
                    let sub = 2 * j + half;
                    let (sc, m) = scale_min_k4(sub, scales);
                    k.scale[2 * sub] = sc as i32;
                    k.scale[2 * sub + 1] = sc as i32;
                    k.min[2 * sub] = m as i32;
                    k.min[2 * sub + 1] = m as i32;
                    for l in 0..32 {
                        let nib = if half == 0 { qs[32 * j + l] & 0xF } else { qs[32 * j + l] >> 4 };
                        let high = qh.map_or(0, |h| ((h[l] >> sub) & 1) << 4);
                        k.code[32 * sub + l] = (nib | high) as i32;
                    }
                }
            }
        }
        QType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            k.d = f16_at(b, 208);
            for (g, s) in k.scale.iter_mut().enumerate() {
                *s = sc[g] as i8 as i32;
            }
            for h in 0..2 {
                let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                for l in 0..32 {
                    let e = 128 * h + l;
                    k.code[e] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    k.code[e + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    k.code[e + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    k.code[e + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
            }
        }
        _ => unreachable!("{ty:?} is not a K-quant"),
    }
    k
}

/// A row of super-blocks as f32.
pub fn dequantize_k(ty: QType, row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / ty.block_bytes() * QK_K);
    for b in row.chunks_exact(ty.block_bytes()) {
        let k = decode(ty, b);
        out.extend((0..QK_K).map(|e| k.d * (k.scale[e / 16] * k.code[e]) as f32 - k.dmin * k.min[e / 16] as f32));
    }
    out
}

/// The integer parts of one super-block's product: `(Σ scale·code·q, Σ min·bsum)`.
pub fn block_sums_k(ty: QType, b: &[u8], a: &ActBlockK) -> (i32, i32) {
    let k = decode(ty, b);
    let mut isum = 0;
    let mut imin = 0;
    for g in 0..16 {
        let dot: i32 = (16 * g..16 * g + 16).map(|e| k.code[e] * a.qs[e] as i32).sum();
        isum += k.scale[g] * dot;
        imin += k.min[g] * a.bsums[g] as i32;
    }
    (isum, imin)
}

/// One weight row against one Q8_K row, as ggml's reference: per super-block
/// `d·d_a·isum − dmin·d_a·imin`, summed in order.
pub fn dot_row_k(ty: QType, row: &[u8], acts: &[ActBlockK]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.chunks_exact(ty.block_bytes()).zip(acts) {
        let (isum, imin) = block_sums_k(ty, b, a);
        let (d, dmin) = match ty {
            QType::Q6K => (f16_at(b, 208), 0.0),
            _ => (f16_at(b, 0), f16_at(b, 2)),
        };
        sum += d * a.d * isum as f32 - dmin * a.d * imin as f32;
    }
    sum
}
