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

impl Executor for Worker {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        Worker::execute(self, plan)
    }

    fn idle_pass(&mut self) -> Result<()> {
        Worker::idle_pass(self)
    }
}
