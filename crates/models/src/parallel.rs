//! Tensor parallelism: how a model's weights and heads split over the ranks of a group, and
//! the collectives the layers call (through `tessera_parallel::Communicator`).

use std::sync::Arc;

use candle_core::Tensor;
use tessera_parallel::{Communicator, SingleRank};

use crate::{ModelConfig, ModelError, Result};

/// `[start, end)` of part `i` of `n` items split into `parts` near-equal parts (the same
/// split the communicator uses).
pub fn part(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let (base, extra) = (n / parts, n % parts);
    let start = i * base + i.min(extra);
    (start, start + base + usize::from(i < extra))
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
        Self { comm: Arc::new(SingleRank) }
    }

    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm }
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
