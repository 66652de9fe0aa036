//! Output parity on the real SmolLM2 weights: our GGUF path against candle-transformers'
//! `quantized_llama` (which matches llama.cpp token for token on this file), and our GGUF
//! path against the derived safetensors path.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tessera_models::Llama;
use tessera_runner::{SampleSpec, SamplingConfig, SeqStep, StepPlan, Worker};
use tessera_tests::{smollm2_gguf, smollm2_hf, Dequantized};

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The three primary colors are",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
];
const STEPS: usize = 24;

/// Our worker on a model path, plus the tokenised prompts.
fn load_ours(path: &std::path::Path) -> (Worker, Vec<Vec<u32>>) {
    let lm = tessera_loader::open(path, DType::F32, &Device::Cpu).expect("open model");
    let prompts =
        PROMPTS.iter().map(|p| lm.tokenizer.tokenizer.encode(*p, true).expect("encode").get_ids().to_vec()).collect();
    let model = Llama::load(&lm.config, lm.weights.as_ref(), 2048, DType::F32, &Device::Cpu).expect("load");
    (Worker::new(model, 64, 16, DType::F32).expect("worker"), prompts)
}

fn plan(tokens: &[u32], computed: usize, output_index: u64) -> StepPlan {
    StepPlan {
        seqs: vec![SeqStep {
            prompt_logprobs: None,
            lora: None,
            seq_id: 1,
            tokens: tokens[computed..].to_vec(),
            start_pos: computed,
            block_table: (0..tokens.len().div_ceil(16) as u32).collect(),
            sample: Some(SampleSpec {
                config: SamplingConfig::default(),
                output_index,
                history: vec![],
                prompt_len: 0,
            }),
        }],
        lora_ops: vec![],
    }
}

/// Greedy decode with our worker: prefill, then one token per step. Also returns the
/// logits of every step.
fn greedy_ours(w: &mut Worker, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut tokens, mut out, mut logits) = (prompt.to_vec(), vec![], vec![]);
    let mut computed = 0;
    for i in 0..steps {
        let l = w.forward_logits(&plan(&tokens, computed, i as u64)).expect("step");
        let row: Vec<f32> = l.squeeze(0).and_then(|r| r.to_vec1()).expect("logits");
        let next = argmax(&row);
        logits.push(row);
        computed = tokens.len();
        tokens.push(next);
        out.push(next);
    }
    (out, logits)
}

/// The largest |a − b| over the `k` tokens `b` ranks highest in each row (where sampling
/// decides), over paired rows.
fn top_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>], k: usize) -> f32 {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let mut idx: Vec<usize> = (0..y.len()).collect();
        idx.select_nth_unstable_by(k - 1, |&i, &j| y[j].total_cmp(&y[i]));
        worst = idx[..k].iter().map(|&j| (x[j] - y[j]).abs()).fold(worst, f32::max);
    }
    worst
}

/// The largest |a − b| over paired logit rows (as many rows as the shorter side has).
fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// candle-transformers' `quantized_llama` greedy run: its tokens and the logits of each step.
fn greedy_reference(prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let path = smollm2_gguf();
    let mut f = std::fs::File::open(&path).expect("open gguf");
    let content = gguf_file::Content::read(&mut f).expect("gguf");
    let mut m = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).expect("reference model");
    let dev = Device::Cpu;
    let (mut out, mut rows) = (vec![], vec![]);
    let input = Tensor::new(prompt, &dev).and_then(|t| t.unsqueeze(0)).expect("input");
    let mut logits = m.forward(&input, 0).expect("prefill");
    for i in 0..steps {
        let row: Vec<f32> =
            logits.squeeze(0).and_then(|r| r.to_dtype(DType::F32)).and_then(|r| r.to_vec1()).expect("row");
        let next = argmax(&row);
        out.push(next);
        rows.push(row);
        let input = Tensor::new(&[next], &dev).and_then(|t| t.unsqueeze(0)).expect("input");
        logits = m.forward(&input, prompt.len() + i).expect("decode");
    }
    (out, rows)
}

/// Our kernels (Q4_1/Q8_0 × ggml's Q8_1/Q8_0 activations, integer block sums) and candle's
/// follow the same ggml arithmetic but sum in a different order. Activation quantization is
/// discontinuous, so a last-bit difference can flip an 8-bit code and the logits then differ at
/// the quantization-noise level (the same reason llama.cpp's own AVX2 and AVX-512 builds
/// disagree on most of these prompts; candle's own ops differ from `quantized_llama` by up to
/// 1.5 on the chat prompt). So: greedy text token for token, or a divergence at a near-tie,
/// with the logits of the 20 most likely tokens within the quantization noise (the far tail,
/// logits ~20 below the top, drifts more: up to 2.2 with the packed GEMM); model quality is
/// checked by perplexity against llama.cpp (`benches/serving.sh`).
#[test]
fn gguf_path_matches_candle_reference() {
    const KERNEL_TOLERANCE: f32 = 2.0;
    let (mut w, prompts) = load_ours(&smollm2_gguf());
    let mut report = vec![];
    for (text, p) in PROMPTS.iter().zip(&prompts) {
        let (ours, lo) = greedy_ours(&mut w, p, STEPS);
        let (reference, lr) = greedy_reference(p, STEPS);
        let first = ours.iter().zip(&reference).position(|(x, y)| x != y);
        let upto = first.map_or(STEPS, |d| d + 1);
        let noise = top_abs_diff(&lo[..upto], &lr, 20);
        eprintln!("{text:?}: first divergence {first:?}, max |Δlogit| over the top 20 up to it {noise:.4}");
        assert!(
            noise < KERNEL_TOLERANCE,
            "prompt {text:?}: top-20 logits differ by {noise} (tolerance {KERNEL_TOLERANCE})"
        );
        match first {
            Some(d) => {
                let row = &lr[d];
                let margin = row[reference[d] as usize] - row[ours[d] as usize];
                assert!(
                    margin.abs() < KERNEL_TOLERANCE,
                    "prompt {text:?}: divergence at step {d} is not a near-tie (reference margin {margin})"
                );
                report.push(format!(
                    "{text:?}: first divergence at token {d} (near-tie, margin {margin:.4}), max |Δlogit| up to it {noise:.4}"
                ));
            }
            None => report.push(format!("{text:?}: identical for {STEPS} tokens, max |Δlogit| {noise:.4}")),
        }
    }
    eprintln!("GGUF path vs candle's quantized_llama:\n{}", report.join("\n"));
}

/// The GGUF weights dequantized to f32, served as dense weights.
/// Greedy runs of the GGUF path (quantized), the GGUF path dequantized to f32, and the
/// derived safetensors copy.
#[test]
fn safetensors_copy_matches_gguf_path() {
    let (mut wq, prompts) = load_ours(&smollm2_gguf());
    let (mut wf, prompts_hf) = load_ours(&smollm2_hf());
    assert_eq!(prompts, prompts_hf, "derived tokenizer.json tokenises like the GGUF metadata");
    let lm = tessera_loader::open(&smollm2_gguf(), DType::F32, &Device::Cpu).unwrap();
    let dq = Dequantized(lm.weights);
    let mut wd =
        Worker::new(Llama::load(&lm.config, &dq, 2048, DType::F32, &Device::Cpu).unwrap(), 64, 16, DType::F32).unwrap();
    // Quantization noise between Q4_1 x Q8_1 and f32 activations, in logits.
    const QUANT_TOLERANCE: f32 = 2.0;
    let mut report = vec![];
    for (text, p) in PROMPTS.iter().zip(&prompts) {
        let (q, lq) = greedy_ours(&mut wq, p, STEPS);
        let (d, ld) = greedy_ours(&mut wd, p, STEPS);
        let (f, lf) = greedy_ours(&mut wf, p, STEPS);
        // Same f32 weights, two layouts and loaders: equal tokens, logits within 1e-3.
        assert_eq!(d, f, "dequantized GGUF vs safetensors copy, prompt {text:?}");
        let exact = max_abs_diff(&ld, &lf);
        assert!(exact < 1e-3, "prompt {text:?}: f32 logits differ by {exact}");
        // Quantized vs f32: token for token, or a divergence at a near-tie that quantization explains.
        let first = q.iter().zip(&f).position(|(x, y)| x != y);
        let upto = first.map_or(STEPS, |d| d + 1);
        let noise = max_abs_diff(&lq[..upto], &lf);
        assert!(noise < QUANT_TOLERANCE, "prompt {text:?}: logits differ by {noise} (tolerance {QUANT_TOLERANCE})");
        if let Some(d) = first {
            let row = &lf[d];
            let (a, b) = (row[q[d] as usize], row[f[d] as usize]);
            assert!(
                (b - a).abs() < QUANT_TOLERANCE,
                "prompt {text:?}: divergence at step {d} is not a near-tie (f32 margin {})",
                b - a
            );
            report.push(format!("{text:?}: first divergence at token {d}, f32 margin between the two choices {:.3}, max |Δlogit| before {noise:.3}", b - a));
        } else {
            report.push(format!("{text:?}: identical for {STEPS} tokens, max |Δlogit| {noise:.3}"));
        }
    }
    eprintln!("quantized GGUF vs safetensors copy:\n{}", report.join("\n"));
}

/// The f16 KV cache (`--kv-cache-dtype auto` on the CPU) against the f32 cache on the f32
/// safetensors path: keys and values rounded to f16 move the logits by rounding noise only.
#[test]
fn f16_kv_cache_tracks_the_f32_cache() {
    let lm = tessera_loader::open(&smollm2_hf(), DType::F32, &Device::Cpu).expect("open model");
    let prompts: Vec<Vec<u32>> =
        PROMPTS.iter().map(|p| lm.tokenizer.tokenizer.encode(*p, true).expect("encode").get_ids().to_vec()).collect();
    let worker = |kv: DType| {
        let model = Llama::load(&lm.config, lm.weights.as_ref(), 2048, DType::F32, &Device::Cpu).expect("load");
        Worker::new(model, 64, 16, kv).expect("worker")
    };
    let (mut w32, mut w16) = (worker(DType::F32), worker(DType::F16));
    const F16_TOLERANCE: f32 = 0.1;
    for (text, p) in PROMPTS.iter().zip(&prompts) {
        let (a, la) = greedy_ours(&mut w32, p, STEPS);
        let (b, lb) = greedy_ours(&mut w16, p, STEPS);
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        let upto = first.map_or(STEPS, |d| d + 1);
        let noise = max_abs_diff(&la[..upto], &lb);
        eprintln!("{text:?}: f16 vs f32 KV cache: first divergence {first:?}, max |Δlogit| {noise:.4}");
        assert!(noise < F16_TOLERANCE, "prompt {text:?}: f16 cache moves logits by {noise}");
        if let Some(d) = first {
            let margin = la[d][a[d] as usize] - la[d][b[d] as usize];
            assert!(margin.abs() < F16_TOLERANCE, "prompt {text:?}: divergence at {d} is not a near-tie ({margin})");
        }
    }
}
