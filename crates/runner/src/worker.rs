//! One rank's worker: model + physical KV cache; executes step plans.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use tessera_grammar::GrammarHandle;
use tessera_models::{AttentionMetadata, BatchInput, CausalLm, KvCache, LoraAdapter, LoraRows, SeqAttention};

use crate::{sampler, LoraOp, Result, RunnerError, StepPlan, StepResult};

/// The logit rows a step computes for a sequence (unless all rows are asked for): one per
/// prompt token whose log-probability it scores (never the sampling row: a chunk that ends the
/// prompt has one target fewer than tokens), then its sampling row if it samples. The batch
/// builder and the sampler both read the rows by this rule.
fn logit_rows(s: &crate::SeqStep) -> (usize, bool) {
    let targets = s.prompt_logprobs.as_ref().map_or(0, |p| p.targets.len().min(s.tokens.len()));
    (targets, s.sample.is_some())
}

/// Owns the model and the KV memory of one rank.
pub struct Worker {
    model: Box<dyn CausalLm>,
    cache: KvCache,
    device: Device,
    /// LoRA adapters held by this rank, by the engine's id.
    adapters: HashMap<u32, Arc<LoraAdapter>>,
}

impl Worker {
    /// Allocate `num_blocks` cache blocks of `block_size` tokens of `kv_dtype` for `model`.
    pub fn new<M: CausalLm + 'static>(model: M, num_blocks: usize, block_size: usize, kv_dtype: DType) -> Result<Self> {
        Self::from_model(Box::new(model), num_blocks, block_size, kv_dtype)
    }

    /// [`Worker::new`] for a model built through the registry ([`tessera_models::load_model`]).
    pub fn from_model(
        mut model: Box<dyn CausalLm>,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: DType,
    ) -> Result<Self> {
        // Check the fused kernels for the cache this worker serves (every rank of the group
        // builds its worker, so they vote alike); a model checked for it already is not checked again.
        if model.kernels_checked() != Some((model.dtype(), kv_dtype, block_size)) {
            model.check_kernels(kv_dtype, block_size)?;
        }
        let plan = model.parallel_plan();
        if plan.tensor.1 > 1 || plan.stage.1 > 1 {
            tracing::info!("{}: {plan}", model.config().architecture);
        }
        let cfg = model.config();
        let device = model.device().clone();
        let cache = KvCache::new(
            model.num_local_layers(),
            num_blocks,
            block_size,
            model.local_kv_heads(),
            cfg.head_dim,
            kv_dtype,
            &device,
        )?;
        Ok(Self { model, cache, device, adapters: HashMap::new() })
    }

    /// Load or drop adapters as `ops` say (every rank applies the same ops in plan order). Every
    /// op is applied even after one fails (so drops still happen); the first failure is returned.
    fn apply_lora_ops(&mut self, ops: &[LoraOp]) -> Result<()> {
        let mut first = Ok(());
        for op in ops {
            let r = match op {
                LoraOp::Load { id, name, path } => {
                    tessera_loader::PeftAdapter::open(path, self.model.dtype(), &self.device)
                        .map_err(RunnerError::from)
                        .and_then(|src| Ok(self.model.load_lora(name, src.config.clone(), &src)?))
                        .map(|adapter| {
                            self.adapters.insert(*id, Arc::new(adapter));
                        })
                }
                LoraOp::Unload(id) => {
                    self.adapters.remove(id);
                    Ok(())
                }
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// A second handle on this rank's KV memory (shares it).
    pub fn kv_cache(&self) -> KvCache {
        self.cache.clone()
    }

    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }

    /// Serve this rank's experts to other data-parallel replicas' step (no tokens of its own).
    pub fn idle_pass(&mut self) -> Result<()> {
        Ok(self.model.idle_expert_pass()?)
    }

    /// Build the batch tensors of a plan. With `all_rows`, logits are wanted for the last
    /// token of every sequence, otherwise only for sequences that sample.
    fn batch(&self, plan: &StepPlan, all_rows: bool) -> Result<BatchInput> {
        let bs = self.cache.block_size();
        let nb = self.cache.num_blocks() as u32;
        let (mut tokens, mut positions, mut slots, mut rows) = (vec![], vec![], vec![], vec![]);
        // (adapter id, its token rows), in order of first appearance.
        let mut lora: Vec<(u32, Vec<u32>)> = vec![];
        let mut seqs = Vec::with_capacity(plan.seqs.len());
        for s in &plan.seqs {
            let end = s.start_pos + s.tokens.len();
            if s.tokens.is_empty() || s.block_table.len() * bs < end {
                return Err(RunnerError::Plan(format!(
                    "sequence {}: {} tokens ending at {end} need {} blocks, table has {}",
                    s.seq_id,
                    s.tokens.len(),
                    end.div_ceil(bs),
                    s.block_table.len()
                )));
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b >= nb) {
                return Err(RunnerError::Plan(format!("sequence {}: block {b} out of range", s.seq_id)));
            }
            let slot = |p: usize| s.block_table[p / bs] * bs as u32 + (p % bs) as u32;
            let q_start = tokens.len();
            tokens.extend_from_slice(&s.tokens);
            positions.extend((s.start_pos..end).map(|p| p as u32));
            slots.extend((s.start_pos..end).map(slot));
            seqs.push(SeqAttention {
                q_start,
                q_len: s.tokens.len(),
                ctx_len: end,
                block_table: s.block_table[..end.div_ceil(bs)].to_vec(),
            });
            if let Some(id) = s.lora {
                let rows = q_start as u32..tokens.len() as u32;
                match lora.iter_mut().find(|(a, _)| *a == id) {
                    Some((_, r)) => r.extend(rows),
                    None => lora.push((id, rows.collect())),
                }
            }
            if all_rows {
                rows.push((tokens.len() - 1) as u32);
            } else {
                let (targets, samples) = logit_rows(s);
                rows.extend((q_start..q_start + targets).map(|r| r as u32));
                if samples {
                    rows.push((tokens.len() - 1) as u32);
                }
            }
        }
        let dev = &self.device;
        Ok(BatchInput {
            tokens: Tensor::new(tokens.as_slice(), dev)?,
            positions: Tensor::new(positions.as_slice(), dev)?,
            attn: AttentionMetadata { slot_mapping: Tensor::new(slots.as_slice(), dev)?, block_size: bs, seqs },
            logits_indices: Tensor::new(rows.as_slice(), dev)?,
            lora: lora
                .into_iter()
                .map(|(id, rows)| {
                    let adapter = self
                        .adapters
                        .get(&id)
                        .cloned()
                        .ok_or_else(|| RunnerError::Plan(format!("LoRA adapter {id} is not loaded")))?;
                    Ok(LoraRows::new(adapter, rows, dev)?)
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The model forward over `plan`, as pipeline micro-batches: with `P` stages the
    /// sequences are split into up to `P` groups run one after another, so that stage `s`
    /// computes group `m + 1` while stage `s + 1` computes group `m`. Every rank splits the
    /// same plan the same way. Logits (on the rank that gets them) are concatenated in order.
    fn forward_micro_batched(&mut self, plan: &StepPlan, all_rows: bool) -> Result<Tensor> {
        let stages = self.model.pipeline_stages();
        if stages == 1 || plan.seqs.len() < 2 {
            let input = self.batch(plan, all_rows)?;
            return Ok(self.model.forward(&input, &self.cache)?);
        }
        let per = plan.seqs.len().div_ceil(stages);
        let mut parts = Vec::with_capacity(stages);
        for seqs in plan.seqs.chunks(per) {
            let sub = StepPlan { seqs: seqs.to_vec(), lora_ops: vec![] };
            let input = self.batch(&sub, all_rows)?;
            parts.push(self.model.forward_stage(&input, &self.cache)?);
        }
        // Logits travel only after every micro-batch went through this stage: stage 0 never
        // waits on the last stage between micro-batches, and no link carries activations and
        // logits in opposite directions at once.
        Ok(self.model.route_logits(parts)?)
    }

    /// Logits `[num_seqs, vocab]` of the last token of every sequence in the plan.
    pub fn forward_logits(&mut self, plan: &StepPlan) -> Result<Tensor> {
        self.apply_lora_ops(&plan.lora_ops)?;
        self.forward_micro_batched(plan, true)
    }

    /// The forward of a step as a non-sampling rank runs it (same collectives as rank 0).
    pub fn forward_logits_for_sampling(&mut self, plan: &StepPlan) -> Result<()> {
        self.apply_lora_ops(&plan.lora_ops)?;
        if plan.seqs.is_empty() {
            return Ok(());
        }
        self.forward_micro_batched(plan, false)?;
        Ok(())
    }

    /// Run one step and sample a token for every sequence that asks for one.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        let tp = self.model.tensor_parallel();
        if tp.world() == 1 && self.model.pipeline_stages() == 1 && !tp.experts_span_replicas() {
            // A lone rank runs its whole step on a compute-pool thread: the step's serial parts
            // and its parallel kernels then share the pool's threads, instead of a third thread
            // contending with workers that spin between kernels. (Ranks that wait on each
            // other in collectives stay on their own threads: a pool thread blocked in a
            // collective could starve the rank it waits for.)
            return rayon::scope(|_| self.execute_here(plan));
        }
        self.execute_here(plan)
    }

    fn execute_here(&mut self, plan: &StepPlan) -> Result<Vec<StepResult>> {
        self.apply_lora_ops(&plan.lora_ops)?;
        if plan.seqs.is_empty() {
            return Ok(vec![]);
        }
        // Structured outputs: each constrained sequence's mask is computed on another thread
        // while the forward runs, so a constrained batch costs little more than a free one.
        let constrained: Vec<(u64, GrammarHandle)> = plan
            .seqs
            .iter()
            .filter_map(|s| s.sample.as_ref().and_then(|sp| sp.config.grammar.clone()).map(|g| (s.seq_id, g)))
            .collect();
        let (logits, masks) = if constrained.is_empty() {
            (self.forward_micro_batched(plan, false)?, HashMap::new())
        } else {
            std::thread::scope(|scope| {
                let masks = scope.spawn(|| {
                    let mask = |id: u64, g: &GrammarHandle| {
                        let (m, failed) = g.lock().mask_or_end();
                        if let Some(e) = failed {
                            tracing::warn!("sequence {id} ends here: {e}");
                        }
                        (id, m)
                    };
                    constrained.iter().map(|(id, g)| mask(*id, g)).collect::<HashMap<_, _>>()
                });
                let logits = self.forward_micro_batched(plan, false);
                let masks = masks.join().map_err(|_| RunnerError::Plan("the structured-output thread panicked".into()));
                Ok::<_, RunnerError>((logits?, masks?))
            })?
        };
        if !plan.seqs.iter().any(|s| s.sample.is_some() || s.prompt_logprobs.is_some()) {
            return Ok(vec![]);
        }
        // Which logit row each sequence reads: its prompt-logprob rows, then its sampling row.
        let mut next = 0usize;
        let mut jobs = Vec::with_capacity(plan.seqs.len());
        for s in &plan.seqs {
            let (targets, samples) = logit_rows(s);
            jobs.push((s, next, samples.then_some(next + targets)));
            next += targets + usize::from(samples);
        }
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let (n, vocab) = logits.dims2()?;
        if n < next {
            return Err(RunnerError::Plan(format!("{n} logit rows for {next} planned")));
        }
        let on_cpu = logits.device().is_cpu();
        let copy = if on_cpu { Vec::new() } else { logits.flatten_all()?.to_vec1::<f32>()? };
        let sample_all = |all: &[f32]| -> Vec<StepResult> {
            let row = |r: usize| &all[r * vocab..(r + 1) * vocab];
            // Rows are independent (each sequence has its own seeded stream): sample in parallel.
            jobs.par_iter()
                .filter_map(|&(s, first, sample_row)| {
                    let prompt_logprobs: Vec<_> = match &s.prompt_logprobs {
                        Some(p) => p
                            .targets
                            .iter()
                            .take(s.tokens.len())
                            .enumerate()
                            .map(|(i, &t)| sampler::logprobs(row(first + i), t, p.top))
                            .collect(),
                        None => Vec::new(),
                    };
                    let (token, logprobs) = match (&s.sample, sample_row) {
                        (Some(spec), Some(r)) => {
                            let (t, lp) = match masks.get(&s.seq_id) {
                                Some(mask) => {
                                    let mut masked = row(r).to_vec();
                                    mask.apply(&mut masked);
                                    sampler::sample(&masked, spec)
                                }
                                None => sampler::sample(row(r), spec),
                            };
                            if let Some(Err(e)) = spec.config.grammar.as_ref().map(|g| g.lock().commit(t)) {
                                tracing::warn!("sequence {}: {e}", s.seq_id);
                            }
                            (Some(t), lp)
                        }
                        _ => (None, None),
                    };
                    (token.is_some() || !prompt_logprobs.is_empty()).then_some(StepResult {
                        seq_id: s.seq_id,
                        token,
                        logprobs,
                        prompt_logprobs,
                    })
                })
                .collect()
        };
        let out =
            if on_cpu { tessera_models::with_cpu_f32(&logits, |all| Ok(sample_all(all)))? } else { sample_all(&copy) };
        Ok(out)
    }
}

/// A check report as the metric's labels: (op, `fused` or `reference`, the reason's first word).
pub fn kernel_path(r: &tessera_models::fused::KernelReport) -> (String, String, String) {
    let path = if r.fused { "fused" } else { "reference" };
    let reason = r.reason.split([':', ' ']).next().unwrap_or_default();
    (r.op.as_str().to_string(), path.to_string(), reason.to_string())
}
