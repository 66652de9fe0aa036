//! Tensor-parallel execution: rank 0 sends each step's plan to the other ranks (which only
//! execute, never schedule), then every rank runs the same forward, meeting in the
//! collectives; only rank 0 samples.
//!
//! The plan travels as a compact binary message; an empty message tells the ranks to stop,
//! and [`IDLE`] to take part in other data-parallel replicas' MoE exchanges without tokens.

use std::sync::Arc;

use tessera_models::Communicator;

use crate::{
    Executor, LoraOp, PromptLogprobs, Result, RunnerError, SampleSpec, SamplingConfig, SeqStep, StepPlan, StepResult,
    Worker,
};

/// The message of an idle pass (a plan message is at least 4 bytes).
const IDLE: &[u8] = &[1];

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

/// The plan as the other ranks need it: tokens, positions, block tables, and which rows
/// want logits (sampling settings stay on rank 0; prompt log-probability targets travel so
/// that every rank computes the same rows).
pub fn encode_plan(plan: &StepPlan) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + plan.num_tokens() * 4);
    put_u32(&mut out, plan.seqs.len());
    for s in &plan.seqs {
        out.extend_from_slice(&s.seq_id.to_le_bytes());
        put_u32(&mut out, s.start_pos);
        out.push(u8::from(s.sample.is_some()));
        put_u32(&mut out, s.tokens.len());
        s.tokens.iter().for_each(|&t| put_u32(&mut out, t as usize));
        put_u32(&mut out, s.block_table.len());
        s.block_table.iter().for_each(|&b| put_u32(&mut out, b as usize));
        match &s.prompt_logprobs {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                put_u32(&mut out, p.top);
                put_u32(&mut out, p.targets.len());
                p.targets.iter().for_each(|&t| put_u32(&mut out, t as usize));
            }
        }
        match s.lora {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                put_u32(&mut out, id as usize);
            }
        }
    }
    put_u32(&mut out, plan.lora_ops.len());
    for op in &plan.lora_ops {
        match op {
            LoraOp::Load { id, name, path } => {
                out.push(1);
                put_u32(&mut out, *id as usize);
                put_bytes(&mut out, name.as_bytes());
                put_bytes(&mut out, path.as_os_str().as_encoded_bytes());
            }
            LoraOp::Unload(id) => {
                out.push(0);
                put_u32(&mut out, *id as usize);
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| RunnerError::Plan("truncated plan message".into()))?;
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| RunnerError::Plan("a plan string is not UTF-8".into()))
    }

    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.u32()? as usize;
        if n > self.b.len() / 4 {
            return Err(RunnerError::Plan(format!("plan message claims {n} entries")));
        }
        (0..n).map(|_| self.u32()).collect()
    }
}

pub fn decode_plan(b: &[u8]) -> Result<StepPlan> {
    let mut r = Reader { b, at: 0 };
    let n = r.u32()? as usize;
    let mut seqs = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let id = u64::from_le_bytes(r.take(8)?.try_into().map_err(|_| RunnerError::Plan("seq id".into()))?);
        let start_pos = r.u32()? as usize;
        let sample = r.take(1)?[0] != 0;
        let tokens = r.u32s()?;
        let block_table = r.u32s()?;
        let prompt_logprobs = match r.take(1)?[0] {
            0 => None,
            _ => Some(PromptLogprobs { top: r.u32()? as usize, targets: r.u32s()? }),
        };
        let lora = match r.take(1)?[0] {
            0 => None,
            _ => Some(r.u32()?),
        };
        seqs.push(SeqStep {
            lora,
            prompt_logprobs,
            seq_id: id,
            tokens,
            start_pos,
            block_table,
            sample: sample.then(|| SampleSpec {
                config: SamplingConfig::default(),
                output_index: 0,
                history: vec![],
                prompt_len: 0,
            }),
        });
    }
    let n = r.u32()? as usize;
    let mut lora_ops = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        lora_ops.push(match r.take(1)?[0] {
            0 => LoraOp::Unload(r.u32()?),
            _ => LoraOp::Load { id: r.u32()?, name: r.string()?, path: r.string()?.into() },
        });
    }
    Ok(StepPlan { seqs, lora_ops })
}

/// Rank 0's executor: broadcast the plan, then execute and sample locally.
pub struct TensorParallelExecutor {
    worker: Worker,
    comm: Arc<dyn Communicator>,
    failed: Option<String>,
    /// Every rank's local layer count, asked once (KV transfer).
    kv_layers: Option<Vec<usize>>,
}

impl TensorParallelExecutor {
    pub fn new(worker: Worker, comm: Arc<dyn Communicator>) -> Self {
        Self { worker, comm, failed: None, kv_layers: None }
    }

    /// Run a KV operation with the group; a broken link fails the executor like a step.
    fn kv<T>(&mut self, op: impl FnOnce(&Worker, &dyn Communicator, &[usize]) -> Result<T>) -> Result<T> {
        if let Some(e) = &self.failed {
            return Err(RunnerError::Rank(e.clone()));
        }
        let layers = match self.kv_layers.take() {
            Some(l) => Ok(l),
            None => crate::kvio::layers_per_rank(&self.worker, self.comm.as_ref()),
        };
        let r = layers.and_then(|l| {
            let r = op(&self.worker, self.comm.as_ref(), &l);
            self.kv_layers = Some(l);
            r
        });
        if let Err(RunnerError::Rank(e)) = &r {
            self.failed = Some(e.clone());
            self.comm.shutdown();
        }
        r
    }
}

impl Executor for TensorParallelExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        if let Some(e) = &self.failed {
            return Err(RunnerError::Rank(e.clone()));
        }
        if plan.seqs.is_empty() {
            return Ok(vec![]);
        }
        let r = self
            .comm
            .broadcast_bytes(&encode_plan(plan), 0)
            .map_err(|e| RunnerError::Rank(e.to_string()))
            .and_then(|_| self.worker.execute(plan));
        if let Err(e) = &r {
            // A failed step leaves the group out of step: close our links so that the other
            // ranks stop waiting on us and end (their pods restart) instead of hanging.
            self.failed = Some(e.to_string());
            self.comm.shutdown();
            return Err(RunnerError::Rank(e.to_string()));
        }
        r
    }

    fn failure(&self) -> Option<String> {
        self.failed.clone()
    }

    fn kernel_paths(&self) -> Vec<(String, String, String)> {
        self.worker.kernel_paths()
    }

    fn kv_read(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        self.kv(|w, c, l| crate::kvio::read(w, c, l, blocks))
    }

    fn kv_write(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.kv(|w, c, l| crate::kvio::write(w, c, l, blocks, data))
    }

    fn idle_pass(&mut self) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(RunnerError::Rank(e.clone()));
        }
        let r = self
            .comm
            .broadcast_bytes(IDLE, 0)
            .map_err(|e| RunnerError::Rank(e.to_string()))
            .and_then(|_| self.worker.idle_pass());
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
            self.comm.shutdown();
        }
        r
    }
}

impl Drop for TensorParallelExecutor {
    fn drop(&mut self) {
        if self.failed.is_none() {
            let _ = self.comm.broadcast_bytes(&[], 0);
        }
    }
}

/// A non-zero rank: execute every plan rank 0 sends until told to stop. Returns the error
/// that ended it, if any.
pub fn follow_plans(mut worker: Worker, comm: Arc<dyn Communicator>) -> Result<()> {
    loop {
        let msg = comm.broadcast_bytes(&[], 0).map_err(|e| RunnerError::Rank(e.to_string()))?;
        if msg.is_empty() {
            return Ok(());
        }
        if msg == IDLE {
            worker.idle_pass()?;
            continue;
        }
        if crate::kvio::is_kv_message(&msg) {
            crate::kvio::follow_kv(&worker, comm.as_ref(), &msg)?;
            continue;
        }
        let plan = decode_plan(&msg)?;
        worker.forward_logits_for_sampling(&plan)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_without_sampling_settings() {
        let plan = StepPlan {
            seqs: vec![
                SeqStep {
                    seq_id: 7,
                    tokens: vec![1, 2, 3],
                    start_pos: 0,
                    block_table: vec![4, 5],
                    sample: None,
                    prompt_logprobs: Some(PromptLogprobs { top: 2, targets: vec![2, 3, 11] }),
                    lora: Some(3),
                },
                SeqStep {
                    seq_id: u64::MAX,
                    tokens: vec![9],
                    start_pos: 40,
                    block_table: vec![0, 1, 2],
                    sample: Some(SampleSpec {
                        config: SamplingConfig::default(),
                        output_index: 0,
                        history: vec![],
                        prompt_len: 0,
                    }),
                    prompt_logprobs: None,
                    lora: None,
                },
            ],
            lora_ops: vec![LoraOp::Load { id: 3, name: "sql".into(), path: "/mnt/lora/sql".into() }, LoraOp::Unload(1)],
        };
        assert_eq!(decode_plan(&encode_plan(&plan)).unwrap(), plan);
        assert!(decode_plan(&encode_plan(&plan)[..10]).is_err());
        assert!(decode_plan(&[255, 255, 255, 255]).is_err());
    }
}
