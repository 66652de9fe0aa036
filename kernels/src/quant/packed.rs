//! Weights re-laid for the SIMD GEMM: eight output rows interleaved per block, so that one
//! 256-bit integer dot product with a broadcast group of four activations yields partial sums
//! for eight output columns at once, and the per-block scales load as vectors.
//!
//! Per group of 8 rows and per block: `d[8]` and `m[8]` as f32 (the value is `d·code + m`:
//! Q4_1's minimum, Q4_0's `−8·d`, Q8_0's `−128·d` as its codes are stored +128), then the codes.
//! Q4 codes stay nibbles: byte `4j + t` of vector `c < 4` is row `j`'s `qs[4c + t]` (its low
//! nibble is element `4c + t`, its high nibble element `16 + 4c + t`). Q8_0 codes are bytes,
//! vector `c < 8` holding elements `4c..4c+4` of the 8 rows. Rows past the end are zero.

use super::{f16_at, QType, QK};

/// Rows interleaved per group.
pub(crate) const GROUP: usize = 8;

/// The packed copy of a matrix (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    pub data: Vec<u8>,
    /// Bytes per (group, block).
    pub stride: usize,
    pub groups: usize,
}

/// Whether `ty` has a packed layout. Q4_K is packed as Q4_1 blocks of 32 (each sub-block's
/// `d·scale` and `−dmin·min` as its scale and minimum), multiplied with Q8_K activations
/// seen as 32-value blocks.
pub(crate) fn packable(ty: QType) -> bool {
    matches!(ty, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::Q4K)
}

/// Q4_K's super-block `blk` as 8 blocks in Q4_1 form: `(d, m, 16 bytes of nibble pairs)`,
/// byte `i` holding codes `i` (low) and `16 + i` (high) of the 32.
fn q4k_blocks(blk: &[u8]) -> [(f32, f32, [u8; 16]); 8] {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let (scales, qs) = (&blk[4..16], &blk[16..144]);
    std::array::from_fn(|sub| {
        let (sc, mn) = super::kquant::scale_min_k4(sub, scales);
        let code = |l: usize| if sub % 2 == 0 { qs[32 * (sub / 2) + l] & 0xF } else { qs[32 * (sub / 2) + l] >> 4 };
        (d * sc as f32, -dmin * mn as f32, std::array::from_fn(|i| code(i) | (code(16 + i) << 4)))
    })
}

fn code_bytes(ty: QType) -> usize {
    if ty == QType::Q8_0 {
        8 * 32
    } else {
        4 * 32
    }
}

/// Pack `rows × cols` blocks of `ty` (`row(j)` gives row `j`'s block bytes).
pub(crate) fn pack<'a>(ty: QType, rows: usize, cols: usize, row: impl Fn(usize) -> &'a [u8]) -> Packed {
    let nb = cols / QK;
    let bb = ty.block_bytes();
    // Blocks of 32 per stored block (8 for a K super-block).
    let per = ty.block_elems() / QK;
    let stride = 2 * GROUP * 4 + code_bytes(ty);
    let groups = rows.div_ceil(GROUP);
    let mut data = vec![0u8; groups * nb * stride];
    for g in 0..groups {
        for b in 0..nb {
            let at = (g * nb + b) * stride;
            let (scales, codes) = data[at..at + stride].split_at_mut(2 * GROUP * 4);
            for j in 0..GROUP.min(rows - g * GROUP) {
                let blk = &row(g * GROUP + j)[b / per * bb..(b / per + 1) * bb];
                if ty == QType::Q4K {
                    let (d, m, nib) = q4k_blocks(blk)[b % per];
                    scales[4 * j..4 * j + 4].copy_from_slice(&d.to_le_bytes());
                    scales[4 * GROUP + 4 * j..4 * GROUP + 4 * j + 4].copy_from_slice(&m.to_le_bytes());
                    for c in 0..4 {
                        codes[32 * c + 4 * j..32 * c + 4 * j + 4].copy_from_slice(&nib[4 * c..4 * c + 4]);
                    }
                    continue;
                }
                let d = f16_at(blk, 0);
                let m = match ty {
                    QType::Q4_1 => f16_at(blk, 2),
                    QType::Q4_0 => -8.0 * d,
                    _ => -128.0 * d,
                };
                scales[4 * j..4 * j + 4].copy_from_slice(&d.to_le_bytes());
                scales[4 * GROUP + 4 * j..4 * GROUP + 4 * j + 4].copy_from_slice(&m.to_le_bytes());
                let qs = if ty == QType::Q4_1 { &blk[4..] } else { &blk[2..] };
                let vectors = code_bytes(ty) / 32;
                for c in 0..vectors {
                    for t in 0..4 {
                        let v = qs[4 * c + t];
                        codes[32 * c + 4 * j + t] = if ty == QType::Q8_0 { (v as i8 as i16 + 128) as u8 } else { v };
                    }
                }
            }
        }
    }
    Packed { data, stride, groups }
}
