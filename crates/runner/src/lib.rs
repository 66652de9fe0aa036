//! The per-rank worker: owns the device, the model and the physical KV cache tensors, and
//! executes one [`StepPlan`] at a time (build the batch, run the forward, sample).
//!
//! Owns: turning block tables into cache slots, batch tensors, sampling.
//! Must not touch: scheduling decisions (which sequences run, which blocks they get — the
//! plan says so), HTTP, tokenisation, or files beyond what the loader hands over.

mod error;
mod lockstep;
mod plan;
mod ranks;
mod sampler;
mod worker;

pub use error::{Result, RunnerError};
pub use lockstep::LockstepExecutor;
pub use plan::{PromptLogprobs, SampleSpec, SamplingConfig, SeqStep, StepPlan, StepResult, TokenLogprobs};
pub use ranks::{decode_plan, encode_plan, follow_plans, TensorParallelExecutor};
pub use sampler::{logprobs, sample};
pub use worker::Worker;

/// Something that executes step plans: the local [`Worker`], or a fan-out to several ranks.
pub trait Executor: Send {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>>;

    /// Why this executor can no longer run steps (a lost rank), if it cannot.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Whether this executor's steps must be matched by the other data-parallel replicas
    /// (data-parallel expert parallelism): then the engine calls [`Executor::tick`] while it
    /// has nothing to run, and an empty plan still counts as a step.
    fn lockstep(&self) -> bool {
        false
    }

    /// With nothing to run: take part in the other replicas' step, if any replica has one.
    /// Returns whether one had.
    fn tick(&mut self) -> Result<bool> {
        Ok(false)
    }

    /// Serve this rank's share of a step other replicas run (MoE experts), with no tokens.
    fn idle_pass(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One rank's KV memory as bytes, by block (the prefill/decode KV transfer reads pinned
/// blocks and writes pulled ones through this, beside the steps that run on other blocks).
pub trait KvBlockStore: Send + Sync {
    fn num_layers(&self) -> usize;
    /// Bytes of one block of one layer's keys (and again of its values).
    fn block_bytes(&self) -> usize;
    /// Append one layer's `blocks`: every block's keys, then every block's values.
    fn read_blocks(&self, layer: usize, blocks: &[u32], out: &mut Vec<u8>) -> Result<()>;
    /// Write data laid out as [`KvBlockStore::read_blocks`] gives it.
    fn write_blocks(&self, layer: usize, blocks: &[u32], data: &[u8]) -> Result<()>;
}

impl KvBlockStore for tessera_models::KvCache {
    fn num_layers(&self) -> usize {
        tessera_models::KvCache::num_layers(self)
    }
    fn block_bytes(&self) -> usize {
        tessera_models::KvCache::block_bytes(self)
    }
    fn read_blocks(&self, layer: usize, blocks: &[u32], out: &mut Vec<u8>) -> Result<()> {
        Ok(tessera_models::KvCache::read_blocks(self, layer, blocks, out)?)
    }
    fn write_blocks(&self, layer: usize, blocks: &[u32], data: &[u8]) -> Result<()> {
        Ok(tessera_models::KvCache::write_blocks(self, layer, blocks, data)?)
    }
}

/// The KV memory of every rank of one parallel worker (ranks in order), as one store whose
/// layers are rank 0's local layers, then rank 1's, and so on: two workers of the same tensor
/// and pipeline layout exchange blocks rank by rank.
pub struct RankedKv {
    ranks: Vec<tessera_models::KvCache>,
    /// (rank, local layer) of each store layer.
    index: Vec<(usize, usize)>,
}

impl RankedKv {
    /// The ranks' caches in rank order; every rank's blocks must be the same size.
    pub fn new(ranks: Vec<tessera_models::KvCache>) -> Result<Self> {
        let bb = ranks.first().map(|c| c.block_bytes()).unwrap_or(0);
        if let Some(r) = ranks.iter().position(|c| c.block_bytes() != bb) {
            return Err(RunnerError::Plan(format!("rank {r}'s KV blocks differ in size from rank 0's")));
        }
        let index = ranks.iter().enumerate().flat_map(|(r, c)| (0..c.num_layers()).map(move |l| (r, l))).collect();
        Ok(Self { ranks, index })
    }

    fn at(&self, layer: usize) -> Result<(&tessera_models::KvCache, usize)> {
        let &(r, l) = self.index.get(layer).ok_or_else(|| RunnerError::Plan(format!("no KV layer {layer}")))?;
        Ok((&self.ranks[r], l))
    }
}

impl KvBlockStore for RankedKv {
    fn num_layers(&self) -> usize {
        self.index.len()
    }
    fn block_bytes(&self) -> usize {
        self.ranks.first().map_or(0, |c| c.block_bytes())
    }
    fn read_blocks(&self, layer: usize, blocks: &[u32], out: &mut Vec<u8>) -> Result<()> {
        let (c, l) = self.at(layer)?;
        Ok(c.read_blocks(l, blocks, out)?)
    }
    fn write_blocks(&self, layer: usize, blocks: &[u32], data: &[u8]) -> Result<()> {
        let (c, l) = self.at(layer)?;
        Ok(c.write_blocks(l, blocks, data)?)
    }
}

impl Executor for Worker {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        Worker::execute(self, plan)
    }

    fn idle_pass(&mut self) -> Result<()> {
        Worker::idle_pass(self)
    }
}
