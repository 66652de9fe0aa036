//! The per-rank worker: owns the device, the model and the physical KV cache tensors, and
//! executes one [`StepPlan`] at a time (build the batch, run the forward, sample).
//!
//! Owns: turning block tables into cache slots, batch tensors, sampling.
//! Must not touch: scheduling decisions (which sequences run, which blocks they get — the
//! plan says so), HTTP, tokenisation, or files beyond what the loader hands over.

mod error;
mod kvio;
mod lockstep;
mod plan;
mod ranks;
mod sampler;
mod worker;

pub use error::{Result, RunnerError};
pub use kvio::{KvBlockStore, RankedKv};
pub use lockstep::LockstepExecutor;
pub use plan::{LoraOp, PromptLogprobs, SampleSpec, SamplingConfig, SeqStep, StepPlan, StepResult, TokenLogprobs};
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

    /// Every rank's KV bytes of `blocks`, in [`RankedKv`]'s order (between steps: the
    /// prefill/decode transfer of a worker whose ranks span processes).
    fn kv_read(&mut self, _blocks: &[u32]) -> Result<Vec<u8>> {
        Err(RunnerError::Plan("this executor cannot read KV blocks".into()))
    }

    /// Write what [`Executor::kv_read`] gives into `blocks` of every rank.
    fn kv_write(&mut self, _blocks: &[u32], _data: &[u8]) -> Result<()> {
        Err(RunnerError::Plan("this executor cannot write KV blocks".into()))
    }

    /// The path each fused kernel takes after its start-up check, as (op, `fused` or
    /// `reference`, reason); empty when the executor does not know.
    fn kernel_paths(&self) -> Vec<(String, String, String)> {
        vec![]
    }
}

impl Executor for Worker {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        Worker::execute(self, plan)
    }

    fn idle_pass(&mut self) -> Result<()> {
        Worker::idle_pass(self)
    }

    fn kv_read(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.kv_cache().read_all(blocks)
    }

    fn kv_write(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.kv_cache().write_all(blocks, data)
    }

    fn kernel_paths(&self) -> Vec<(String, String, String)> {
        self.model().kernel_reports().iter().map(worker::kernel_path).collect()
    }
}
