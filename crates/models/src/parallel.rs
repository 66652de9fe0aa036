//! Tensor parallelism: how a model's weights and heads split over the ranks of a group, and
//! the collectives the layers call (through `tessera_parallel::Communicator`).

use std::sync::Arc;

use candle_core::Tensor;
pub use tessera_parallel::part;
use tessera_parallel::{Communicator, SingleRank};

use crate::{ModelConfig, ModelError, Result};

/// The byte ranges of a shard of a row-major `[rows, cols]` matrix stored in units of
/// `unit_elems` elements taking `unit_bytes` bytes each (1 and the element size for dense
/// data, the block size and block bytes for quantized data), with the shard's shape. `dim`
/// 0 is rows `a..b` (one range), 1 is columns `a..b` (one range per row). `None` when a
/// column cut falls inside a unit.
pub fn shard_byte_runs(
    [rows, cols]: [usize; 2],
    (unit_elems, unit_bytes): (usize, usize),
    dim: usize,
    (a, b): (usize, usize),
) -> Option<(Vec<std::ops::Range<usize>>, [usize; 2])> {
    if !cols.is_multiple_of(unit_elems) {
        return None;
    }
    let row_bytes = cols / unit_elems * unit_bytes;
    match dim {
        0 => Some((std::iter::once(a * row_bytes..b * row_bytes).collect(), [b - a, cols])),
        1 if a.is_multiple_of(unit_elems) && b.is_multiple_of(unit_elems) => {
            let (from, to) = (a / unit_elems * unit_bytes, b / unit_elems * unit_bytes);
            Some(((0..rows).map(|r| r * row_bytes + from..r * row_bytes + to).collect(), [rows, b - a]))
        }
        _ => None,
    }
}

/// Which part of a weight a rank loads: part `index` of `count` along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole weight.
    pub const FULL: Shard = Shard { dim: 0, index: 0, count: 1 };

    pub fn new(dim: usize, index: usize, count: usize) -> Self {
        Self { dim, index, count }
    }

    /// `[start, end)` along the split dimension of size `n`.
    pub fn range(&self, n: usize) -> (usize, usize) {
        part(n, self.count, self.index)
    }

    pub fn is_full(&self) -> bool {
        self.count == 1
    }
}

/// A rank's place in its tensor-parallel group.
#[derive(Clone)]
pub struct TensorParallel {
    comm: Arc<dyn Communicator>,
    expert_parallel: bool,
    /// With data-parallel expert parallelism: every rank of every replica, over which the
    /// experts are split (otherwise the experts use this tensor group).
    experts: Option<Arc<dyn Communicator>>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorParallel(rank {} of {})", self.rank(), self.world())
    }
}

impl Default for TensorParallel {
    fn default() -> Self {
        Self::single()
    }
}

impl TensorParallel {
    /// No parallelism.
    pub fn single() -> Self {
        Self { comm: Arc::new(SingleRank), expert_parallel: false, experts: None }
    }

    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm, expert_parallel: false, experts: None }
    }

    /// Data-parallel expert parallelism: split the experts over `group` (the ranks of every
    /// data-parallel replica, this tensor group's members consecutive in it) so that each
    /// replica's tokens travel to experts held by any replica.
    pub fn with_expert_group(mut self, group: Arc<dyn Communicator>) -> Self {
        self.expert_parallel = true;
        self.experts = Some(group);
        self
    }

    /// The group the experts are split over.
    pub fn expert_comm(&self) -> &Arc<dyn Communicator> {
        self.experts.as_ref().unwrap_or(&self.comm)
    }

    /// Whether the expert group reaches beyond this tensor group: then every replica takes
    /// part in every MoE exchange, with or without tokens of its own.
    pub fn experts_span_replicas(&self) -> bool {
        self.expert_parallel() && self.expert_comm().world_size() > self.world()
    }

    /// Split MoE experts whole over the group (`--enable-expert-parallel`) instead of
    /// slicing every expert's intermediate dimension.
    pub fn with_expert_parallel(mut self, on: bool) -> Self {
        self.expert_parallel = on;
        self
    }

    pub fn expert_parallel(&self) -> bool {
        self.expert_parallel && self.expert_comm().world_size() > 1
    }

    /// The group's communicator (token exchange of expert parallelism).
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// Sum of the partial results of a row-parallel layer.
    pub fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        if self.world() == 1 {
            return Ok(t.clone());
        }
        Ok(self.comm.all_reduce_sum(t)?)
    }

    /// Concatenation of the ranks' column shards.
    pub fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.world() == 1 {
            return Ok(t.clone());
        }
        Ok(self.comm.all_gather(t, dim)?)
    }

    /// Part `rank` of `world` along `dim` (column-parallel weights, vocabulary).
    pub fn shard(&self, dim: usize) -> Shard {
        Shard::new(dim, self.rank(), self.world())
    }
}

/// How the attention heads of a config split over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Query heads on this rank.
    pub heads: usize,
    /// Key/value heads on this rank (replicated when there are fewer than ranks).
    pub kv_heads: usize,
    /// The rows of the k/v projections this rank loads.
    pub kv_shard: Shard,
}

impl HeadLayout {
    /// The split for `rank` of `world`, or an error naming the numbers that do not divide.
    pub fn new(cfg: &ModelConfig, rank: usize, world: usize) -> Result<Self> {
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        if world == 0 || !nh.is_multiple_of(world) {
            return Err(ModelError::Config(format!(
                "tensor parallel size {world} does not divide the model's {nh} attention heads \
                 (choose a size that divides {nh})"
            )));
        }
        if nkv.is_multiple_of(world) {
            return Ok(Self { heads: nh / world, kv_heads: nkv / world, kv_shard: Shard::new(0, rank, world) });
        }
        if world.is_multiple_of(nkv) {
            // Each KV head is replicated on world / nkv ranks.
            return Ok(Self { heads: nh / world, kv_heads: 1, kv_shard: Shard::new(0, rank / (world / nkv), nkv) });
        }
        Err(ModelError::Config(format!(
            "tensor parallel size {world} and the model's {nkv} key/value heads do not divide one another"
        )))
    }
}

/// A rank's place in the pipeline: its stage's contiguous layer range, and the ranks it
/// passes activations to. Stage `s`, tensor rank `t` is world rank `s * tp + t`; activations
/// go from `(s, t)` to `(s + 1, t)`, and the last stage's tensor rank 0 sends the logits to
/// world rank 0, which samples.
#[derive(Clone)]
pub struct PipelineParallel {
    comm: Option<Arc<dyn Communicator>>,
    pub stage: usize,
    pub stages: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// World rank of the last stage's tensor rank 0.
    source: usize,
}

impl std::fmt::Debug for PipelineParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PipelineParallel(stage {} of {})", self.stage, self.stages)
    }
}

impl Default for PipelineParallel {
    fn default() -> Self {
        Self::single()
    }
}

impl PipelineParallel {
    /// No pipeline: one stage with every layer.
    pub fn single() -> Self {
        Self { comm: None, stage: 0, stages: 1, prev: None, next: None, source: 0 }
    }

    /// Stage `stage` of `stages` in a world of `stages * tp` ranks (`world` is that group).
    pub fn new(world: Arc<dyn Communicator>, stage: usize, stages: usize, tp: usize) -> Self {
        let t = world.rank() % tp;
        Self {
            prev: (stage > 0).then(|| (stage - 1) * tp + t),
            next: (stage + 1 < stages).then(|| (stage + 1) * tp + t),
            source: (stages - 1) * tp,
            comm: Some(world),
            stage,
            stages,
        }
    }

    pub fn is_first(&self) -> bool {
        self.stage == 0
    }

    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.stages
    }

    /// The layers this stage runs, or an error when there are more stages than layers.
    pub fn layers(&self, num_layers: usize) -> Result<std::ops::Range<usize>> {
        if self.stages > num_layers {
            return Err(ModelError::Config(format!(
                "pipeline parallel size {} exceeds the model's {num_layers} layers",
                self.stages
            )));
        }
        let (a, b) = part(num_layers, self.stages, self.stage);
        Ok(a..b)
    }

    fn world(&self) -> Result<&Arc<dyn Communicator>> {
        self.comm.as_ref().ok_or_else(|| ModelError::Config("no pipeline group".into()))
    }

    /// The previous stage's activations (not on the first stage).
    pub fn recv_activations(&self) -> Result<Tensor> {
        let prev = self.prev.ok_or_else(|| ModelError::Config("the first stage has no previous stage".into()))?;
        Ok(self.world()?.recv(prev)?)
    }

    /// Hand activations to the next stage (not on the last stage).
    pub fn send_activations(&self, x: &Tensor) -> Result<()> {
        let next = self.next.ok_or_else(|| ModelError::Config("the last stage has no next stage".into()))?;
        Ok(self.world()?.send(next, x)?)
    }

    /// On the last stage: deliver the logits to world rank 0. On world rank 0 (first
    /// stage): receive them. Other ranks get `None`.
    pub fn route_logits(&self, logits: Option<Tensor>) -> Result<Option<Tensor>> {
        let Some(world) = &self.comm else { return Ok(logits) };
        let me = world.rank();
        match logits {
            Some(l) if me == self.source && me != 0 => {
                world.send(0, &l)?;
                Ok(None)
            }
            Some(l) if me == 0 => Ok(Some(l)),
            Some(_) => Ok(None),
            None if me == 0 => Ok(Some(world.recv(self.source)?)),
            None => Ok(None),
        }
    }
}
