//! The AVX-512 VNNI GEMM over [`Packed`] weights: two adjacent groups of 8 columns at once in
//! 512-bit vectors (group `g` in the low half, `g + 1` in the high half), so that each
//! `vpdpbusd` does 64 multiply-adds instead of 32 and the per-row scaling is one op per 16
//! columns. The packed layout is the 256-bit kernels' (see `packed.rs`): the two halves are
//! joined once per block (`vinserti64x4`) and reused by up to 8 activation rows. A trailing
//! odd group goes to the 256-bit VNNI kernel. Q8_0 (eight joins per block, no unpacking)
//! takes 4 rows per block rather than 8: with 8 it lost to the 256-bit kernel. Arithmetic per column is the same integer dot
//! product and the same f32 scaling as the 256-bit kernel, so the results are bit-equal.

use std::arch::x86_64::*;
use std::ops::Range;

use super::packed::{Packed, GROUP};
use super::{ActBlock, QType};

/// Σ over the 8 code vectors of `w[c]·broadcast(a[4c..4c+4])`: 16 i32 lanes, one per column.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot16(w: &[__m512i; 8], a: *const i8) -> __m512i {
    let mut s = _mm512_setzero_si512();
    for (c, wc) in w.iter().enumerate() {
        let av = _mm512_set1_epi32((a.add(4 * c) as *const i32).read_unaligned());
        s = _mm512_dpbusd_epi32(s, *wc, av);
    }
    s
}

/// Two 256-bit loads, `lo` and `hi`, as one 512-bit vector.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn join(lo: *const u8, hi: *const u8) -> __m512i {
    let l = _mm256_loadu_si256(lo as *const __m256i);
    let h = _mm256_loadu_si256(hi as *const __m256i);
    _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows<const Q8: bool, const MIN: bool, const R: usize>(
    p: &Packed,
    nb: usize,
    g: usize,
    acts: [*const ActBlock; R],
    out: [*mut f32; R],
    cols: usize,
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut accm = [_mm512_setzero_ps(); R];
    let base = p.data.as_ptr().add(g * nb * p.stride);
    let next = nb * p.stride;
    for b in 0..nb {
        let blk = base.add(b * p.stride);
        let blk2 = blk.add(next);
        let d = _mm512_castsi512_ps(join(blk, blk2));
        let m = _mm512_castsi512_ps(join(blk.add(32), blk2.add(32)));
        let (codes, codes2) = (blk.add(64), blk2.add(64));
        let mut w = [_mm512_setzero_si512(); 8];
        if Q8 {
            for (c, wc) in w.iter_mut().enumerate() {
                *wc = join(codes.add(32 * c), codes2.add(32 * c));
            }
        } else {
            for c in 0..4 {
                let v = join(codes.add(32 * c), codes2.add(32 * c));
                w[c] = _mm512_and_si512(v, m4);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
        }
        for r in 0..R {
            let a = &*acts[r].add(b);
            let isum = dot16(&w, a.qs.as_ptr());
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r]);
            let s = if MIN { a.s } else { a.d * a.isum as f32 };
            accm[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(s), accm[r]);
        }
    }
    for r in 0..R {
        let v = _mm512_add_ps(acc[r], accm[r]);
        if cols == 2 * GROUP {
            _mm512_storeu_ps(out[r], v);
        } else {
            let mut tmp = [0f32; 2 * GROUP];
            _mm512_storeu_ps(tmp.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), out[r], cols);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_t<const Q8: bool, const MIN: bool, const MAXR: usize>(
    p: &Packed,
    pairs: Range<usize>,
    acts: &[ActBlock],
    nb: usize,
    out: *mut f32,
    n: usize,
) {
    let m = acts.len() / nb;
    let a = |i: usize| acts.as_ptr().add(i * nb);
    for g in pairs.step_by(2) {
        let cols = (2 * GROUP).min(n - g * GROUP);
        let o = |i: usize| out.add(i * n + g * GROUP);
        let mut i = 0;
        while MAXR >= 8 && m - i >= 8 {
            let (ai, oi): ([*const ActBlock; 8], [*mut f32; 8]) =
                (std::array::from_fn(|r| a(i + r)), std::array::from_fn(|r| o(i + r)));
            rows::<Q8, MIN, 8>(p, nb, g, ai, oi, cols);
            i += 8;
        }
        while i < m {
            match m - i {
                1 => rows::<Q8, MIN, 1>(p, nb, g, [a(i)], [o(i)], cols),
                2 => rows::<Q8, MIN, 2>(p, nb, g, [a(i), a(i + 1)], [o(i), o(i + 1)], cols),
                3 => rows::<Q8, MIN, 3>(p, nb, g, [a(i), a(i + 1), a(i + 2)], [o(i), o(i + 1), o(i + 2)], cols),
                _ => rows::<Q8, MIN, 4>(
                    p,
                    nb,
                    g,
                    [a(i), a(i + 1), a(i + 2), a(i + 3)],
                    [o(i), o(i + 1), o(i + 2), o(i + 3)],
                    cols,
                ),
            }
            i += (m - i).min(4);
        }
    }
}

/// Columns `8·groups` of `out[m, n]` from the packed weights of type `ty`: pairs of groups
/// here, a trailing single group on the 256-bit VNNI kernel.
///
/// # Safety
/// As `x86_packed::vnni::gemm`, and the CPU must have AVX-512 F, BW and VNNI.
pub(crate) unsafe fn gemm(
    p: &Packed,
    ty: QType,
    groups: Range<usize>,
    acts: &[ActBlock],
    nb: usize,
    out: *mut f32,
    n: usize,
) {
    let pairs = groups.start..groups.end - groups.len() % 2;
    match ty {
        _ if pairs.is_empty() => {}
        QType::Q4_1 | QType::Q4K => gemm_t::<false, true, 8>(p, pairs.clone(), acts, nb, out, n),
        QType::Q8_0 => gemm_t::<true, false, 4>(p, pairs.clone(), acts, nb, out, n),
        _ => gemm_t::<false, false, 8>(p, pairs.clone(), acts, nb, out, n),
    }
    if pairs.end < groups.end {
        super::x86_packed::vnni::gemm(p, ty, pairs.end..groups.end, acts, nb, out, n);
    }
}
