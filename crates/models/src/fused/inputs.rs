//! The check's inputs: seeded values in [-2, 2) at the served shapes, the same on every
//! start-up and every device, and for the attention ops a step that mixes a decode, a chunked
//! prefill and a whole prefill over block tables out of order.

use candle_core::{DType, Device, Tensor};

use super::{FusedOp, OpArgs};
use crate::attention::{AttentionMetadata, SeqAttention, StepTables};
use crate::{ModelError, Result};

/// The shapes a model serves (this rank's share), for the check's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ServedShapes {
    pub hidden: usize,
    pub inter: usize,
    pub eps: f32,
    /// Query and key/value heads of this rank, and their dimension.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotary pairs `(2i, 2i + 1)` rather than `(i, i + D/2)`.
    pub interleaved: bool,
    /// Tokens per cache block.
    pub block_size: usize,
}

/// A fixed LCG's `n` values in [-2, 2) times `scale`.
fn values(n: usize, salt: u64, scale: f32) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0) * scale
        })
        .collect()
}

/// One op's inputs for one check round.
pub(super) struct Inputs {
    op: FusedOp,
    t: Vec<Tensor>,
    meta: Option<AttentionMetadata>,
    s: ServedShapes,
}

/// A step of `rows` query rows: a decode row, then a chunked prefill and a whole prefill
/// sharing the rest; blocks handed out from the top down, block 0 never used.
fn step(rows: usize, bs: usize, dev: &Device) -> Result<(AttentionMetadata, usize)> {
    let rest = rows - 1;
    let chunk = rest / 2;
    let mut spans = vec![(1, 2 * bs + 3)];
    if chunk > 0 {
        spans.push((chunk, chunk + bs + 1));
    }
    if rest > chunk {
        spans.push((rest - chunk, rest - chunk));
    }
    let total: usize = spans.iter().map(|&(_, ctx)| ctx.div_ceil(bs)).sum::<usize>() + 1;
    let mut next = total as u32;
    let (mut seqs, mut slots, mut q_start) = (Vec::new(), Vec::new(), 0);
    for (q_len, ctx) in spans {
        let table: Vec<u32> = (0..ctx.div_ceil(bs))
            .map(|_| {
                next -= 1;
                next
            })
            .collect();
        let seq = SeqAttention { q_start, q_len, ctx_len: ctx, block_table: table };
        slots.extend_from_slice(&seq.context_slots(bs)[ctx - q_len..]);
        seqs.push(seq);
        q_start += q_len;
    }
    let meta = AttentionMetadata { slot_mapping: Tensor::new(slots.as_slice(), dev)?, block_size: bs, seqs };
    Ok((meta, total * bs))
}

impl Inputs {
    pub(super) fn new(op: FusedOp, s: &ServedShapes, rows: usize, dev: &Device, dt: (DType, DType)) -> Result<Self> {
        let r = |n: usize, salt: u64, scale: f32, dtype: DType, dims: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_vec(values(n, salt, scale), dims, dev)?.to_dtype(dtype)?)
        };
        let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
        let mut meta = None;
        let t = match op {
            FusedOp::AddRmsNorm => vec![
                r(rows * s.hidden, 1, 1.0, dt.0, &[rows, s.hidden])?,
                r(rows * s.hidden, 2, 1.0, dt.0, &[rows, s.hidden])?,
                r(s.hidden, 3, 1.0, dt.0, &[s.hidden])?,
            ],
            FusedOp::SiluMul => vec![r(rows * 2 * s.inter, 4, 1.0, dt.0, &[rows, 2 * s.inter])?],
            FusedOp::Rotary => {
                let angles = values(rows * d / 2, 5, 1.6);
                let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
                let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
                vec![
                    r(rows * h * d, 6, 1.0, dt.0, &[rows, h, d])?,
                    r(rows * kvh * d, 7, 1.0, dt.0, &[rows, kvh, d])?,
                    Tensor::from_vec(cos, (rows, d / 2), dev)?.to_dtype(dt.0)?,
                    Tensor::from_vec(sin, (rows, d / 2), dev)?.to_dtype(dt.0)?,
                ]
            }
            FusedOp::CacheWrite | FusedOp::PagedAttention => {
                let (m, slots) = step(rows, s.block_size, dev)?;
                let n = m.slot_mapping.dim(0)?;
                meta = Some(m);
                let cache = |salt| r(slots * kvh * d, salt, 1.0, dt.1, &[slots, kvh, d]);
                let mut t = vec![cache(8)?, cache(9)?];
                if op == FusedOp::CacheWrite {
                    t.push(r(n * kvh * d, 10, 1.0, dt.0, &[n, kvh, d])?);
                    t.push(r(n * kvh * d, 11, 1.0, dt.0, &[n, kvh, d])?);
                } else {
                    // Queries scaled down so that the softmax is neither flat nor one-hot.
                    t.push(r(n * h * d, 12, 0.25, dt.0, &[n, h, d])?);
                }
                t
            }
        };
        Ok(Self { op, t, meta, s: *s })
    }

    /// The step's tables, for the attention ops.
    pub(super) fn step(&self) -> Option<StepTables<'_>> {
        self.meta.as_ref().map(|m| StepTables::new(m, self.s.kv_heads, self.s.head_dim))
    }

    pub(super) fn args<'a>(&'a self, step: Option<&'a StepTables<'a>>) -> Result<OpArgs<'a>> {
        let t = &self.t;
        let step = || step.ok_or_else(|| ModelError::Config("the attention check has no step".into()));
        Ok(match self.op {
            FusedOp::AddRmsNorm => OpArgs::AddRmsNorm { x: &t[0], delta: &t[1], w: &t[2], eps: self.s.eps },
            FusedOp::SiluMul => OpArgs::SiluMul { gu: &t[0], inter: self.s.inter },
            FusedOp::Rotary => {
                OpArgs::Rotary { q: &t[0], k: &t[1], cos: &t[2], sin: &t[3], interleaved: self.s.interleaved }
            }
            FusedOp::CacheWrite => {
                OpArgs::CacheWrite { k_cache: &t[0], v_cache: &t[1], k: &t[2], v: &t[3], step: step()? }
            }
            FusedOp::PagedAttention => {
                OpArgs::PagedAttention { q: &t[2], k_cache: &t[0], v_cache: &t[1], step: step()?, window: None }
            }
        })
    }
}
