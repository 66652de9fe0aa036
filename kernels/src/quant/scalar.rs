//! The scalar reference: block decoding and dot products written as plainly as ggml's
//! reference C. Every SIMD path is tested against these.

use super::{f16_at, ActBlock, QType, QK};

/// The 32 integer codes of a block and its offset (the value is `d·(code − offset)` for the
/// symmetric types, `d·code + m` for the ones with a minimum).
fn codes(ty: QType, b: &[u8]) -> ([i32; QK], i32) {
    let mut q = [0i32; QK];
    match ty {
        QType::Q4_0 | QType::Q4_1 => {
            let qs = if ty == QType::Q4_0 { &b[2..18] } else { &b[4..20] };
            for j in 0..QK / 2 {
                q[j] = (qs[j] & 0x0F) as i32;
                q[j + QK / 2] = (qs[j] >> 4) as i32;
            }
        }
        QType::Q5_0 | QType::Q5_1 => {
            let (h, qs) = if ty == QType::Q5_0 { (2, &b[6..22]) } else { (4, &b[8..24]) };
            let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
            for j in 0..QK / 2 {
                q[j] = ((qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i32;
                q[j + QK / 2] = ((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32;
            }
        }
        // Q8_0 (the K-quants are decoded in `kquant`).
        _ => {
            for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                *q = v as i8 as i32;
            }
        }
    }
    let offset = match ty {
        QType::Q4_0 => 8,
        QType::Q5_0 => 16,
        _ => 0,
    };
    (q, offset)
}

/// `(d, m)` of a block (`m` 0 for the symmetric types).
fn scales(ty: QType, b: &[u8]) -> (f32, f32) {
    if ty.has_min() {
        (f16_at(b, 0), f16_at(b, 2))
    } else {
        (f16_at(b, 0), 0.0)
    }
}

/// A row of blocks as f32.
pub fn dequantize(ty: QType, row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / ty.block_bytes() * QK);
    for b in row.chunks_exact(ty.block_bytes()) {
        let (q, off) = codes(ty, b);
        let (d, m) = scales(ty, b);
        out.extend(q.iter().map(|&c| d * (c - off) as f32 + m));
    }
    out
}

/// The integer dot product of one weight block with one activation block (codes offset).
pub fn block_sumi(ty: QType, b: &[u8], a: &ActBlock) -> i32 {
    let (q, off) = codes(ty, b);
    q.iter().zip(&a.qs).map(|(&w, &x)| (w - off) * x as i32).sum()
}

/// The dot product of one weight row with one quantized activation row, as ggml's
/// `vec_dot_*_q8_*` reference: per block `(d_w·d_a)·sumi (+ m_w·s_a)`, summed in order.
pub fn dot_row(ty: QType, row: &[u8], acts: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.chunks_exact(ty.block_bytes()).zip(acts) {
        let (d, m) = scales(ty, b);
        sum += (d * a.d) * block_sumi(ty, b, a) as f32;
        if ty.has_min() {
            sum += m * a.s;
        }
    }
    sum
}

/// [`dot_tile`] for the K-quants, against Q8_K activation rows.
pub fn dot_tile_k(
    w: &super::QMatrix,
    rows: std::ops::Range<usize>,
    acts: &[super::ActBlockK],
    blocks: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    for j in rows {
        let row = w.row(j);
        for (i, a) in acts.chunks_exact(blocks).enumerate() {
            put(i, j, super::kquant::dot_row_k(w.qtype(), row, a));
        }
    }
}

/// Rows `rows` of `w` against `r` activation rows (each `blocks` blocks, `acts` row-major):
/// `out[i][j]` = row `rows.start + j` · activation row `i`, written through `put`.
pub fn dot_tile(
    w: &super::QMatrix,
    rows: std::ops::Range<usize>,
    acts: &[ActBlock],
    blocks: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    for j in rows {
        let row = w.row(j);
        for (i, a) in acts.chunks_exact(blocks).enumerate() {
            put(i, j, dot_row(w.qtype(), row, a));
        }
    }
}
