//! Step-by-step runs of tiny models for the parallelism and model-family tests: a TP = 1
//! greedy reference (its plans and logits) and the same plans replayed on rank groups
//! (threads over the CPU TCP back-end).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use tessera_loader::SafetensorsSource;
use tessera_models::{load_model, Communicator, ModelConfig, PipelineParallel, TensorParallel};
use tessera_parallel::{SubGroup, TcpComm};
use tessera_runner::{SampleSpec, SamplingConfig, SeqStep, StepPlan, Worker};

use crate::tiny::{tiny_weights, write_hf, TinyShape};

pub const BLOCK: usize = 4;
pub const BLOCKS_PER_SEQ: usize = 12;
pub const PROMPTS: [usize; 4] = [3, 7, 12, 20];
pub const DECODE_STEPS: usize = 20;

pub fn model_dir(name: &str, s: TinyShape) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-tp-{}-{name}", std::process::id()));
    write_hf(&dir, s, &tiny_weights(s), 2);
    dir
}

pub fn worker(dir: &Path, tp: TensorParallel) -> Worker {
    staged_worker(dir, tp, PipelineParallel::single())
}

pub fn staged_worker(dir: &Path, tp: TensorParallel, pp: PipelineParallel) -> Worker {
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open(dir, DType::F32, &Device::Cpu).unwrap();
    let model = load_model(&cfg, &src, 256, DType::F32, &Device::Cpu, tp, pp).expect("load the rank's shard");
    Worker::from_model(model, PROMPTS.len() * BLOCKS_PER_SEQ, BLOCK, DType::F32).unwrap()
}

pub fn step(seq: usize, tokens: &[u32], start: usize) -> SeqStep {
    let base = (seq * BLOCKS_PER_SEQ) as u32;
    SeqStep {
        prompt_logprobs: None,
        lora: None,
        seq_id: seq as u64,
        tokens: tokens[start..].to_vec(),
        start_pos: start,
        block_table: (base..base + BLOCKS_PER_SEQ as u32).collect(),
        sample: Some(SampleSpec { config: SamplingConfig::default(), output_index: 0, history: vec![], prompt_len: 0 }),
    }
}

pub fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0) as u32
}

/// TP = 1 greedy run: the plans it executed and its logits per plan.
pub fn reference(dir: &Path, vocab: usize) -> (Vec<StepPlan>, Vec<Vec<Vec<f32>>>) {
    let mut w = worker(dir, TensorParallel::single());
    let mut seqs: Vec<Vec<u32>> =
        PROMPTS.iter().enumerate().map(|(i, &n)| (0..n).map(|t| ((t * 7 + i * 13) % vocab) as u32).collect()).collect();
    let mut plan = StepPlan { seqs: seqs.iter().enumerate().map(|(i, s)| step(i, s, 0)).collect(), lora_ops: vec![] };
    let (mut plans, mut logits) = (vec![], vec![]);
    for _ in 0..=DECODE_STEPS {
        let rows: Vec<Vec<f32>> = w.forward_logits(&plan).unwrap().to_vec2().unwrap();
        let next = StepPlan {
            seqs: seqs
                .iter_mut()
                .zip(&rows)
                .enumerate()
                .map(|(i, (s, row))| {
                    s.push(argmax(row));
                    step(i, s, s.len() - 1)
                })
                .collect(),
            lora_ops: vec![],
        };
        plans.push(std::mem::replace(&mut plan, next));
        logits.push(rows);
    }
    (plans, logits)
}

/// Every rank runs every plan (as the serving ranks would); rank 0's logits are returned.
pub fn run_tp(dir: &Path, world: usize, plans: &[StepPlan]) -> Vec<Vec<Vec<f32>>> {
    run_parallel(dir, world, 1, plans)
}

/// `tp × pp` ranks: stage `s` holds world ranks `s*tp..(s+1)*tp`, each stage a TP subgroup.
pub fn run_parallel(dir: &Path, tp: usize, pp: usize, plans: &[StepPlan]) -> Vec<Vec<Vec<f32>>> {
    let group = TcpComm::local_group(tp * pp, Device::Cpu).expect("rank group");
    let handles: Vec<_> = group
        .into_iter()
        .map(|comm| {
            let (dir, plans) = (dir.to_path_buf(), plans.to_vec());
            std::thread::spawn(move || {
                let world: Arc<dyn Communicator> = Arc::new(comm);
                let stage = world.rank() / tp;
                let (tpc, ppc) = if pp == 1 {
                    (TensorParallel::new(world), PipelineParallel::single())
                } else {
                    let members: Vec<usize> = (stage * tp..(stage + 1) * tp).collect();
                    let sub = SubGroup::new(world.clone(), members, Device::Cpu).expect("subgroup");
                    (TensorParallel::new(Arc::new(sub)), PipelineParallel::new(world, stage, pp, tp))
                };
                let mut w = staged_worker(&dir, tpc, ppc);
                plans.iter().map(|p| w.forward_logits(p).unwrap().to_vec2::<f32>().unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut outs: Vec<Vec<Vec<Vec<f32>>>> = handles.into_iter().map(|h| h.join().expect("rank thread")).collect();
    for (r, o) in outs.iter().enumerate().skip(1) {
        if pp == 1 {
            assert_eq!(o, &outs[0], "rank {r} sees the same gathered logits as rank 0");
        } else {
            assert!(o.iter().all(Vec::is_empty), "under a pipeline only rank 0 gets logits (rank {r})");
        }
    }
    outs.swap_remove(0)
}

pub fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    a.iter().flatten().flatten().zip(b.iter().flatten().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
