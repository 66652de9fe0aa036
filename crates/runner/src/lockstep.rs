//! Data-parallel expert parallelism: the MoE layers of every replica exchange tokens with
//! every other replica's, so the replicas must run their forwards together although each
//! schedules on its own. Before each step the replicas' rank 0s sum a "have work" flag over
//! their group; if any replica has work, all run one forward — the busy ones their plan, the
//! idle ones an idle pass that only serves their experts. An engine with nothing to run keeps
//! calling [`Executor::tick`], so a busy replica waits at most one idle poll for the others.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tessera_models::Communicator;

use crate::{Executor, Result, RunnerError, StepPlan, StepResult};

/// Rank 0 of one replica under data-parallel expert parallelism.
pub struct LockstepExecutor {
    inner: Box<dyn Executor>,
    /// The replicas' rank 0s.
    leaders: Arc<dyn Communicator>,
    /// Every rank of every replica; closed on failure so no peer waits on us.
    experts: Arc<dyn Communicator>,
    failed: Option<String>,
}

impl LockstepExecutor {
    pub fn new(inner: Box<dyn Executor>, leaders: Arc<dyn Communicator>, experts: Arc<dyn Communicator>) -> Self {
        Self { inner, leaders, experts, failed: None }
    }

    fn guard<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
            self.experts.shutdown();
        }
        r
    }

    /// Whether any replica has a step to run (every replica's rank 0 calls this once per step).
    fn anyone(&mut self, mine: bool) -> Result<bool> {
        if let Some(e) = &self.failed {
            return Err(RunnerError::Rank(e.clone()));
        }
        let flag = Tensor::new(&[if mine { 1f32 } else { 0.0 }], &Device::Cpu)?;
        let sum = self.leaders.all_reduce_sum(&flag).map_err(|e| RunnerError::Rank(e.to_string()));
        let sum = self.guard(sum)?;
        Ok(sum.to_vec1::<f32>()?.first().is_some_and(|&s| s > 0.0))
    }

    fn serve_others(&mut self) -> Result<()> {
        let r = self.inner.idle_pass();
        self.guard(r)
    }
}

impl Executor for LockstepExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        let any = self.anyone(!plan.seqs.is_empty())?;
        if plan.seqs.is_empty() {
            if any {
                self.serve_others()?;
            }
            return Ok(vec![]);
        }
        let r = self.inner.execute(plan);
        self.guard(r)
    }

    fn failure(&self) -> Option<String> {
        self.failed.clone().or_else(|| self.inner.failure())
    }

    fn lockstep(&self) -> bool {
        true
    }

    fn kernel_paths(&self) -> Vec<(String, String, String)> {
        self.inner.kernel_paths()
    }

    fn kv_read(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.inner.kv_read(blocks)
    }

    fn kv_write(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.inner.kv_write(blocks, data)
    }

    fn tick(&mut self) -> Result<bool> {
        let any = self.anyone(false)?;
        if any {
            self.serve_others()?;
        }
        Ok(any)
    }
}
