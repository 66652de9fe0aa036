//! The per-rank worker: owns the device, the model and the physical KV cache tensors, and
//! executes one [`StepPlan`] at a time (build the batch, run the forward, sample).
//!
//! Owns: turning block tables into cache slots, batch tensors, sampling.
//! Must not touch: scheduling decisions (which sequences run, which blocks they get — the
//! plan says so), HTTP, tokenisation, or files beyond what the loader hands over.

mod error;
mod plan;
mod ranks;
mod sampler;
mod worker;

pub use error::{Result, RunnerError};
pub use plan::{SampleSpec, SamplingConfig, SeqStep, StepPlan, StepResult, TokenLogprobs};
pub use ranks::{decode_plan, encode_plan, follow_plans, TensorParallelExecutor};
pub use sampler::sample;
pub use worker::Worker;

/// Something that executes step plans: the local [`Worker`], or a fan-out to several ranks.
pub trait Executor: Send {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>>;

    /// Why this executor can no longer run steps (a lost rank), if it cannot.
    fn failure(&self) -> Option<String> {
        None
    }
}

impl Executor for Worker {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        Worker::execute(self, plan)
    }
}
