//! Paged attention on the CPU: each sequence's queries attend over its context read in place
//! from the paged cache through its block table (no gather, no mask tensor), with an online
//! softmax, causal for chunked prefill, the query heads of one KV head sharing every K/V row
//! load. Tasks are (sequence, KV head) pairs on the rayon pool.
//!
//! One body serves every instruction set: it is written so that the compiler vectorises it
//! (independent lanes, a polynomial `exp`), and compiled once plainly (the reference) and once
//! with AVX2+FMA enabled.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::math::{dot, exp_neg, fma};
use crate::out::Out;
use crate::{Isa, KernelError, Result};

/// One sequence of the batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    /// First row of its queries in the flat batch.
    pub q_start: usize,
    /// Its query tokens in this step (the last `q_len` positions of the context).
    pub q_len: usize,
    /// Its context length (cached prefix and this step's tokens).
    pub ctx: usize,
    /// Its block table: context position `j` is cache slot
    /// `blocks[j / block_size] · block_size + j % block_size`.
    pub blocks: &'a [u32],
}

impl SeqSpan<'_> {
    /// The cache slots of context positions `j0..j0 + n` into `out` (one division per block).
    #[inline(always)]
    fn slots(&self, block_size: usize, j0: usize, n: usize, out: &mut [usize]) {
        let (mut j, mut i) = (j0, 0);
        while i < n {
            let (b, off) = (j / block_size, j % block_size);
            let run = (block_size - off).min(n - i);
            let base = self.blocks[b] as usize * block_size + off;
            for (r, o) in out[i..i + run].iter_mut().enumerate() {
                *o = base + r;
            }
            i += run;
            j += run;
        }
    }
}

/// Heads, head size, and the cache's tokens per block.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Sliding window: a query sees only the last `window` positions up to its own (0: all).
    pub window: usize,
}

/// A KV cache element type.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// `dst = src` as f32.
    fn load(src: &[Self], dst: &mut [f32]);

    /// `dst = src` rounded to this type (to nearest, ties to even, as candle's casts).
    fn store(src: &[f32], dst: &mut [Self]);

    /// [`KvElem::load`] inside x86 code compiled with AVX2+F16C (it may use them).
    #[inline(always)]
    fn load_x86(src: &[Self], dst: &mut [f32]) {
        Self::load(src, dst)
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn load(src: &[f16], dst: &mut [f32]) {
        // half's slice conversion: F16C eight at a time where the CPU has it (one feature
        // check per row, not per element).
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }

    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn load_x86(src: &[f16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let n = src.len().min(dst.len());
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: only called from the AVX2+F16C item (`task_avx2`); 8 values in range.
                unsafe {
                    let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
                i += 8;
            }
            for j in i..n {
                dst[j] = src[j].to_f32();
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self::load(src, dst)
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn load(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }

    #[inline(always)]
    fn store(src: &[f32], dst: &mut [bf16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

/// The paged cache write ("reshape and cache"): row `i` of `rows` (`row_len` values each,
/// one token's KV heads) stored at slot `slots[i]` of `cache`, converted to its element type.
pub fn write_cache_rows<E: KvElem>(cache: &mut [E], rows: &[f32], slots: &[u32], row_len: usize) -> Result<()> {
    if rows.len() != slots.len() * row_len {
        return Err(KernelError::Shape(format!("{} cache rows of {row_len} given {} values", slots.len(), rows.len())));
    }
    let capacity = cache.len() / row_len.max(1);
    if let Some(bad) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(KernelError::Shape(format!("cache slot {bad} is outside the cache's {capacity} slots")));
    }
    for (row, &slot) in rows.chunks(row_len.max(1)).zip(slots) {
        let at = slot as usize * row_len;
        E::store(row, &mut cache[at..at + row_len]);
    }
    Ok(())
}

/// Query vectors handled together (sharing each K/V row load).
const TILE: usize = 16;
/// Context positions scored per softmax update.
const CHUNK: usize = 64;

/// Tiles of query vectors per work item: a long prefill is split over several items (and
/// threads); a decode step's few query heads are one tile.
const TILES_PER_ITEM: usize = 4;

/// The online-softmax update of one query vector's chunk of scores `r` (those in
/// `first..valid` are real: before `first` lies outside a sliding window, from `valid` on after
/// the query): scores become weights, and `(m, l)` the running maximum and sum. Returns the
/// factor the accumulated output must be scaled by.
#[inline(always)]
fn softmax_chunk<const X: bool>(r: &mut [f32], first: usize, valid: usize, m: &mut f32, l: &mut f32) -> f32 {
    if first >= valid {
        r.fill(0.0);
        return 1.0;
    }
    let cmax = r[first..valid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mnew = m.max(cmax);
    let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - mnew).exp() };
    for x in r[first..valid].iter_mut() {
        *x = exp_neg::<X>(*x - mnew);
    }
    r[..first].fill(0.0);
    r[valid..].fill(0.0);
    // Eight partial sums (vectorises; a single running sum would not).
    let mut part = [0f32; 8];
    for c in r.chunks(8) {
        for (p, x) in part.iter_mut().zip(c) {
            *p += x;
        }
    }
    let sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    *l = *l * corr + sum;
    *m = mnew;
    corr
}

/// Per-thread scratch of the work items (kept between calls: no allocation per item).
struct Scratch {
    kt: Vec<f32>,
    vc: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> =
        const { std::cell::RefCell::new(Scratch { kt: Vec::new(), vc: Vec::new(), acc: Vec::new() }) };
}

/// `v` as `N` arrays of `M` (grown to size; stale contents are finite values or zeros).
fn arrays<const M: usize, const N: usize>(v: &mut Vec<f32>) -> &mut [[f32; M]; N] {
    if v.len() < M * N {
        v.resize(M * N, 0.0);
    }
    // SAFETY: `v` holds at least M·N f32s, and `[[f32; M]; N]` has f32's alignment.
    unsafe { &mut *(v.as_mut_ptr() as *mut [[f32; M]; N]) }
}

/// Query vector `pair` (query row × grouped head) of a sequence's item: its row within the
/// sequence and its offset in `q` and `out`.
#[inline(always)]
fn pair_at(s: &SeqSpan, shape: AttnShape, kvh: usize, pair: usize) -> (usize, usize) {
    let (d, g) = (shape.head_dim, shape.heads / shape.kv_heads);
    let (i, hh) = (pair / g, pair % g);
    (i, (s.q_start + i) * shape.heads * d + (kvh * g + hh) * d)
}

/// Put query vector `pair`, scaled by 1/√d, into `qb`; returns the context positions it
/// sees, `lo..lim` (causal, and within the sliding window if any).
#[inline(always)]
fn start_query(q: &[f32], s: &SeqSpan, shape: AttnShape, kvh: usize, pair: usize, qb: &mut [f32]) -> (usize, usize) {
    let (i, at) = pair_at(s, shape, kvh, pair);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    for (dst, src) in qb.iter_mut().zip(&q[at..at + shape.head_dim]) {
        *dst = src * scale;
    }
    let lim = s.ctx - s.q_len + i + 1;
    let lo = if shape.window == 0 { 0 } else { lim.saturating_sub(shape.window) };
    (lo, lim)
}

/// Write query vector `pair`'s output: its accumulated values over the softmax sum `l`.
#[inline(always)]
fn finish_query(out: Out, s: &SeqSpan, shape: AttnShape, kvh: usize, pair: usize, acc: &[f32], l: f32) {
    let (_, at) = pair_at(s, shape, kvh, pair);
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (e, a) in acc.iter().enumerate() {
        // SAFETY: each item writes only its own (rows of its sequence and tiles, heads of its
        // KV head) cells, disjoint from every other item's.
        unsafe { *out.at(at + e) = a * inv };
    }
}

/// Query vectors in a tile from which scores come from the transposed key block (below it,
/// one dot product per query and key is cheaper than transposing).
const TRANSPOSE_FROM: usize = 8;

/// One work item for a head size known at compile time. For a tile of many query vectors
/// (prefill), the keys of each context chunk are converted once into a transposed block, so
/// a chunk's scores come from broadcast multiply-adds with no horizontal sums, and the values
/// into a row block; each query's output stays in registers over the chunk. A tile of a
/// few (decode) takes one dot product per query and key.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn task_d<E: KvElem, const D: usize, const X: bool>(
    q: &[f32],
    k: &[E],
    v: &[E],
    s: &SeqSpan,
    kvh: usize,
    shape: AttnShape,
    tiles: std::ops::Range<usize>,
    out: Out,
    scratch: &mut Scratch,
) {
    let Scratch { kt, vc, acc } = scratch;
    let kt = arrays::<CHUNK, D>(kt);
    let vc = arrays::<D, CHUNK>(vc);
    let acc = arrays::<D, TILE>(acc);
    let kvn = shape.kv_heads;
    let pairs = s.q_len * (shape.heads / kvn);
    let mut qb = [[0f32; D]; TILE];
    let mut sc = [[0f32; CHUNK]; TILE];
    let mut row = [0f32; D];
    let (mut m, mut l, mut lim) = ([f32::NEG_INFINITY; TILE], [0f32; TILE], [0usize; TILE]);
    let mut lo = [0usize; TILE];
    for t in tiles {
        let t0 = t * TILE;
        if t0 >= pairs {
            break;
        }
        let tn = (pairs - t0).min(TILE);
        for p in 0..tn {
            (lo[p], lim[p]) = start_query(q, s, shape, kvh, t0 + p, &mut qb[p]);
            m[p] = f32::NEG_INFINITY;
            l[p] = 0.0;
            acc[p] = [0.0; D];
        }
        let jmax = lim[..tn].iter().copied().max().unwrap_or(0);
        let jmin = lo[..tn].iter().copied().min().unwrap_or(0);
        let transpose = tn >= TRANSPOSE_FROM;
        let mut slot = [0usize; CHUNK];
        for j0 in (jmin..jmax).step_by(CHUNK) {
            let jn = (jmax - j0).min(CHUNK);
            s.slots(shape.block_size, j0, jn, &mut slot);
            for jj in 0..jn {
                let at = (slot[jj] * kvn + kvh) * D;
                if X {
                    E::load_x86(&k[at..at + D], &mut row);
                } else {
                    E::load(&k[at..at + D], &mut row);
                }
                if transpose {
                    for (e, x) in row.iter().enumerate() {
                        kt[e][jj] = *x;
                    }
                } else {
                    for p in 0..tn {
                        sc[p][jj] = dot::<X>(&qb[p], &row);
                    }
                }
                if X {
                    E::load_x86(&v[at..at + D], &mut vc[jj]);
                } else {
                    E::load(&v[at..at + D], &mut vc[jj]);
                }
            }
            for p in 0..tn {
                if transpose {
                    // Eight partial sums per key over the inputs `e ≡ l (mod 8)`, combined as
                    // `dot` combines its lanes: the scores equal the per-key dot products to the
                    // bit, so a query's result does not depend on the tile it fell in (nor a
                    // prompt's scores on how it was chunked).
                    let mut part = [[0f32; CHUNK]; 8];
                    for (l, pl) in part.iter_mut().enumerate() {
                        for e in (l..D).step_by(8) {
                            let (qv, kr) = (qb[p][e], &kt[e]);
                            for (s, kx) in pl.iter_mut().zip(kr) {
                                *s = fma::<X>(qv, *kx, *s);
                            }
                        }
                    }
                    for (j, s) in sc[p].iter_mut().enumerate() {
                        *s = ((part[0][j] + part[4][j]) + (part[1][j] + part[5][j]))
                            + ((part[2][j] + part[6][j]) + (part[3][j] + part[7][j]));
                    }
                }
                let valid = lim[p].saturating_sub(j0).min(jn);
                let first = lo[p].saturating_sub(j0).min(jn);
                let corr = softmax_chunk::<X>(&mut sc[p][..jn], first, valid, &mut m[p], &mut l[p]);
                let mut a = acc[p];
                if corr != 1.0 {
                    a.iter_mut().for_each(|x| *x *= corr);
                }
                for (w, vr) in sc[p][..valid].iter().zip(vc.iter()) {
                    for (x, y) in a.iter_mut().zip(vr) {
                        *x = fma::<X>(*w, *y, *x);
                    }
                }
                acc[p] = a;
            }
        }
        for p in 0..tn {
            finish_query(out, s, shape, kvh, t0 + p, &acc[p], l[p]);
        }
    }
}

/// One work item for any head size (heap buffers, per-query dot products).
#[allow(clippy::too_many_arguments)]
fn task_any<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    s: &SeqSpan,
    kvh: usize,
    shape: AttnShape,
    tiles: std::ops::Range<usize>,
    out: Out,
) {
    let (kvn, d) = (shape.kv_heads, shape.head_dim);
    let pairs = s.q_len * (shape.heads / kvn);
    let mut qb = vec![0f32; TILE * d];
    let mut acc = vec![0f32; TILE * d];
    let mut sc = vec![0f32; TILE * CHUNK];
    let mut row = vec![0f32; d];
    let (mut m, mut l, mut lim) = ([f32::NEG_INFINITY; TILE], [0f32; TILE], [0usize; TILE]);
    let mut lo = [0usize; TILE];
    for t in tiles {
        let t0 = t * TILE;
        if t0 >= pairs {
            break;
        }
        let tn = (pairs - t0).min(TILE);
        for p in 0..tn {
            (lo[p], lim[p]) = start_query(q, s, shape, kvh, t0 + p, &mut qb[p * d..(p + 1) * d]);
            m[p] = f32::NEG_INFINITY;
            l[p] = 0.0;
            acc[p * d..(p + 1) * d].fill(0.0);
        }
        let jmax = lim[..tn].iter().copied().max().unwrap_or(0);
        let jmin = lo[..tn].iter().copied().min().unwrap_or(0);
        let mut slot = [0usize; CHUNK];
        for j0 in (jmin..jmax).step_by(CHUNK) {
            let jn = (jmax - j0).min(CHUNK);
            s.slots(shape.block_size, j0, jn, &mut slot);
            for jj in 0..jn {
                let at = (slot[jj] * kvn + kvh) * d;
                E::load(&k[at..at + d], &mut row);
                for p in 0..tn {
                    sc[p * CHUNK + jj] = dot::<false>(&qb[p * d..(p + 1) * d], &row);
                }
            }
            for p in 0..tn {
                let valid = lim[p].saturating_sub(j0).min(jn);
                let first = lo[p].saturating_sub(j0).min(jn);
                let corr =
                    softmax_chunk::<false>(&mut sc[p * CHUNK..p * CHUNK + jn], first, valid, &mut m[p], &mut l[p]);
                if corr != 1.0 {
                    acc[p * d..(p + 1) * d].iter_mut().for_each(|a| *a *= corr);
                }
            }
            for jj in 0..jn {
                let at = (slot[jj] * kvn + kvh) * d;
                E::load(&v[at..at + d], &mut row);
                for p in 0..tn {
                    let w = sc[p * CHUNK + jj];
                    if w != 0.0 {
                        for (a, x) in acc[p * d..(p + 1) * d].iter_mut().zip(&row) {
                            *a += w * x;
                        }
                    }
                }
            }
        }
        for p in 0..tn {
            finish_query(out, s, shape, kvh, t0 + p, &acc[p * d..(p + 1) * d], l[p]);
        }
    }
}

/// One work item on the head size's best variant.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn task<E: KvElem, const X: bool>(
    q: &[f32],
    k: &[E],
    v: &[E],
    s: &SeqSpan,
    kvh: usize,
    shape: AttnShape,
    tiles: std::ops::Range<usize>,
    out: Out,
    scratch: &mut Scratch,
) {
    match shape.head_dim {
        64 => task_d::<E, 64, X>(q, k, v, s, kvh, shape, tiles, out, scratch),
        128 => task_d::<E, 128, X>(q, k, v, s, kvh, shape, tiles, out, scratch),
        256 => task_d::<E, 256, X>(q, k, v, s, kvh, shape, tiles, out, scratch),
        _ => task_any(q, k, v, s, kvh, shape, tiles, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn task_avx2<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    s: &SeqSpan,
    kvh: usize,
    shape: AttnShape,
    tiles: std::ops::Range<usize>,
    out: Out,
    scratch: &mut Scratch,
) {
    task::<E, true>(q, k, v, s, kvh, shape, tiles, out, scratch)
}

/// Attention of every sequence: `q` is `[T, heads, head_dim]` f32, the caches
/// `[blocks · block_size, kv_heads, head_dim]` (already holding this step's keys/values), `out` is
/// `[T, heads · head_dim]`. Rows of `out` no sequence covers are left as they are.
pub fn paged_attention<E: KvElem>(
    isa: Isa,
    q: &[f32],
    k: &[E],
    v: &[E],
    seqs: &[SeqSpan],
    shape: AttnShape,
    out: &mut [f32],
) -> Result<()> {
    let AttnShape { heads, kv_heads, head_dim, block_size, .. } = shape;
    if kv_heads == 0
        || block_size == 0
        || !heads.is_multiple_of(kv_heads)
        || q.len() != out.len()
        || !q.len().is_multiple_of(heads * head_dim)
    {
        return Err(KernelError::Shape(format!(
            "attention: {heads} heads over {kv_heads} KV heads of {head_dim}, q holds {}, out {}",
            q.len(),
            out.len()
        )));
    }
    let rows = q.len() / (heads * head_dim);
    let blocks = k.len() / (kv_heads * head_dim) / block_size;
    for s in seqs {
        let table = s.ctx.div_ceil(block_size);
        if s.q_start + s.q_len > rows || s.q_len > s.ctx || table > s.blocks.len() || v.len() != k.len() {
            return Err(KernelError::Shape(format!(
                "attention: sequence rows {}..{} of {rows}, context {} in {} blocks of {block_size}",
                s.q_start,
                s.q_start + s.q_len,
                s.ctx,
                s.blocks.len()
            )));
        }
        // O(blocks), not O(context): the block table is checked once per call.
        if let Some(bad) = s.blocks[..table].iter().find(|&&b| b as usize >= blocks) {
            return Err(KernelError::Shape(format!("attention: block {bad} outside the cache's {blocks}")));
        }
    }
    let o = Out(out.as_mut_ptr());
    let run = |(si, kvh, t): (usize, usize, usize)| {
        let s = &seqs[si];
        let tiles = t..t + TILES_PER_ITEM;
        // The scratch is taken here, outside the instruction-set function, so that the whole
        // item compiles with its features (a closure inside it would not).
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            match isa {
                // SAFETY: AVX2+FMA+F16C are present when `Isa::available` lists an x86 SIMD path.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni => unsafe {
                    task_avx2(q, k, v, s, kvh, shape, tiles, o, scratch)
                },
                _ => task::<E, false>(q, k, v, s, kvh, shape, tiles, o, scratch),
            }
        })
    };
    isa.ensure_available()?;
    // Items: (sequence, KV head, first tile).
    let group = heads / kv_heads;
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let tiles = (s.q_len * group).div_ceil(TILE);
            (0..kv_heads).flat_map(move |h| (0..tiles).step_by(TILES_PER_ITEM).map(move |t| (si, h, t)))
        })
        .collect();
    if tasks.len() == 1 {
        run(tasks[0]);
    } else if !tasks.is_empty() {
        tasks.into_par_iter().for_each(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
