//! LoRA adapters end to end, on random rank-8 PEFT adapters written by the test (all seven
//! projections of every layer):
//! - SmolLM2 (f32): the served adapter's logits equal the base model with merged weights
//!   (W + scale·B·A) within 1e-4, at every position of a prefill and 8 decode steps;
//! - a mixed batch (base + two adapters) equals each sequence run alone;
//! - on a tiny model, adapters under TP = 2 equal TP = 1;
//! - over HTTP: `--lora-modules`, `/v1/models`, requests naming adapters, load and unload at
//!   run time, the `vllm:lora_requests_info` metric, and prefix-cache keys per adapter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tessera_loader::SafetensorsSource;
use tessera_models::{Llama, ModelConfig, Shard, Weight, WeightSource};
use tessera_runner::{LoraOp, StepPlan, Worker};
use tessera_tests::adapters::{write_adapter, write_adapter_of_rank};
use tessera_tests::steps::{max_diff, run_tp, step};
use tessera_tests::tiny::{tiny_weights, write_hf, TinyShape};
use tessera_tests::{client, metric, serve_args, smollm2_hf};

/// The base weights with the adapter merged in.
struct Merged<'a> {
    base: &'a dyn WeightSource,
    deltas: &'a HashMap<String, Tensor>,
}

impl WeightSource for Merged<'_> {
    fn get(&self, name: &str) -> tessera_models::Result<Weight> {
        let w = self.base.get(name)?;
        match self.deltas.get(name) {
            Some(d) => Ok(Weight::Dense((w.dense(DType::F32)? + d)?)),
            None => Ok(w),
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }
    fn get_shard(&self, name: &str, full: &[usize], shard: Shard) -> tessera_models::Result<Weight> {
        self.get_shard_by_narrowing(name, full, shard)
    }
}

fn config(dir: &Path) -> ModelConfig {
    ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// Teacher-forced runs: every sequence prefills `tokens[..prompt]`, then decodes the rest one
/// token per step. Each step's logits, per sequence (last position).
fn run(w: &mut Worker, seqs: &[(usize, Vec<u32>, Option<u32>)], prompt: usize, ops: Vec<LoraOp>) -> Vec<Vec<Vec<f32>>> {
    let mut out = vec![];
    let mut ops = Some(ops);
    for end in prompt..=seqs[0].1.len() {
        let start = if end == prompt { 0 } else { end - 1 };
        let plan = StepPlan {
            seqs: seqs
                .iter()
                .map(|(i, t, lora)| tessera_runner::SeqStep { lora: *lora, ..step(*i, &t[..end], start) })
                .collect(),
            lora_ops: ops.take().unwrap_or_default(),
        };
        out.push(w.forward_logits(&plan).unwrap().to_vec2::<f32>().unwrap());
    }
    out
}

/// Column `j` of every step (one sequence's logits).
fn column(all: &[Vec<Vec<f32>>], j: usize) -> Vec<Vec<Vec<f32>>> {
    all.iter().map(|step| vec![step[j].clone()]).collect()
}

fn loads(ops: &[(u32, &str, &Path)]) -> Vec<LoraOp> {
    ops.iter()
        .map(|(id, name, path)| LoraOp::Load { id: *id, name: name.to_string(), path: path.to_path_buf() })
        .collect()
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tessera-lora-{}-{name}", std::process::id()))
}

#[test]
fn smollm2_adapter_equals_merged_weights_and_a_mixed_batch_equals_each_alone() {
    let hf = smollm2_hf();
    let cfg = config(&hf);
    let (a_dir, b_dir) = (tmp("a"), tmp("b"));
    let delta_a = write_adapter(&a_dir, &cfg, 0.02);
    write_adapter(&b_dir, &cfg, 0.02);
    let src = SafetensorsSource::open(&hf, DType::F32, &Device::Cpu).unwrap();
    let worker = |src: &dyn WeightSource| {
        let model = Llama::load(&cfg, src, 256, DType::F32, &Device::Cpu).unwrap();
        // 12 blocks of 4 tokens per sequence (the step helper's layout), 4 sequences.
        Worker::new(model, 48, 4, DType::F32).unwrap()
    };
    let toks = |seed: u32| -> Vec<u32> { (0..30).map(|t| 1 + (t * 7919 + seed * 104_729) % 49_000).collect() };
    let prompt = 22;
    let mut base = worker(&src);
    let lora = loads(&[(1, "a", &a_dir), (2, "b", &b_dir)]);
    // The adapter alone against the merged weights.
    let served = run(&mut base, &[(0, toks(1), Some(1))], prompt, lora.clone());
    let mut merged = worker(&Merged { base: &src, deltas: &delta_a });
    let want = run(&mut merged, &[(0, toks(1), None)], prompt, vec![]);
    let d = max_diff(&served, &want);
    let base_alone = run(&mut base, &[(0, toks(1), None)], prompt, vec![]);
    let effect = max_diff(&base_alone, &want);
    println!(
        "SmolLM2 + rank-8 adapter vs merged weights: max |Δlogit| = {d:e} (adapter moves logits by up to {effect})"
    );
    assert!(effect > 0.1, "the adapter must change the output for this test to mean anything ({effect})");
    assert!(d < 1e-4, "adapter vs merged weights: {d}");
    // A mixed batch: base, adapter a, adapter b (different prompts) against each alone.
    let mixed = run(&mut base, &[(0, toks(2), None), (1, toks(3), Some(1)), (2, toks(4), Some(2))], prompt, vec![]);
    for (j, (seed, lora)) in [(2, None), (3, Some(1)), (4, Some(2))].into_iter().enumerate() {
        let alone = run(&mut base, &[(3, toks(seed), lora)], prompt, vec![]);
        let d = max_diff(&column(&mixed, j), &alone);
        println!("mixed batch, sequence {j} ({lora:?}) vs alone: max |Δlogit| = {d:e}");
        assert!(d < 1e-4, "sequence {j} on {lora:?} differs in a mixed batch by {d}");
    }
    let _ = (std::fs::remove_dir_all(&a_dir), std::fs::remove_dir_all(&b_dir));
}

#[test]
fn adapters_under_tensor_parallel_equal_one_rank() {
    let shape = TinyShape::default();
    let dir = tmp("tiny");
    write_hf(&dir, shape, &tiny_weights(shape), 1);
    let cfg = config(&dir);
    let (a_dir, b_dir) = (tmp("tiny-a"), tmp("tiny-b"));
    write_adapter(&a_dir, &cfg, 0.2);
    write_adapter(&b_dir, &cfg, 0.2);
    let toks = |seed: u32| -> Vec<u32> { (0..24).map(|t| (t * 31 + seed * 17) % shape.vocab as u32).collect() };
    let seqs = [(0, toks(1), Some(1)), (1, toks(2), None), (2, toks(3), Some(2)), (3, toks(4), Some(1))];
    let prompt = 13;
    let mut plans = vec![];
    let mut ops = Some(loads(&[(1, "a", &a_dir), (2, "b", &b_dir)]));
    for end in prompt..=24 {
        let start = if end == prompt { 0 } else { end - 1 };
        plans.push(StepPlan {
            seqs: seqs
                .iter()
                .map(|(i, t, lora)| tessera_runner::SeqStep { lora: *lora, ..step(*i, &t[..end], start) })
                .collect(),
            lora_ops: ops.take().unwrap_or_default(),
        });
    }
    let one = run_tp(&dir, 1, &plans);
    let two = run_tp(&dir, 2, &plans);
    let without: Vec<StepPlan> = plans
        .iter()
        .map(|p| StepPlan {
            seqs: p.seqs.iter().map(|s| tessera_runner::SeqStep { lora: None, ..s.clone() }).collect(),
            lora_ops: vec![],
        })
        .collect();
    let effect = max_diff(&one, &run_tp(&dir, 1, &without));
    let d = max_diff(&one, &two);
    println!("tiny model, two adapters and the base in one batch: TP=2 vs TP=1 max |Δlogit| = {d:e} (adapters move logits by {effect})");
    assert!(effect > 0.1, "the adapters must change the output ({effect})");
    assert!(d < 1e-4, "TP=2 with adapters differs from TP=1 by {d}");
    for p in [&dir, &a_dir, &b_dir] {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// The labels of the `vllm:lora_requests_info` sample.
fn lora_info(text: &str) -> HashMap<String, String> {
    let line = text.lines().find(|l| l.starts_with("vllm:lora_requests_info{")).expect("the LoRA info metric");
    let labels = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    labels
        .split("\",")
        .filter_map(|kv| kv.split_once("=\""))
        .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_over_http_load_unload_metrics_and_prefix_cache_keys() {
    std::env::set_var("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True");
    let hf = smollm2_hf();
    let cfg = config(&hf);
    let (a_dir, b_dir, big_dir) = (tmp("http-a"), tmp("http-b"), tmp("http-big"));
    // Stronger than the logit tests' adapters, so that greedy text visibly changes.
    write_adapter(&a_dir, &cfg, 0.05);
    write_adapter(&b_dir, &cfg, 0.05);
    write_adapter_of_rank(&big_dir, &cfg, 0.02, 32);
    let module = format!("a={}", a_dir.display());
    let flags = ["--enable-lora", "--lora-modules", &module, "--max-loras", "2", "--max-lora-rank", "16"];
    let running = tessera::launch(serve_args(&hf, &flags)).await.expect("worker with an adapter starts");
    let base = format!("http://{}", running.addr);
    let c = client();
    let models: serde_json::Value = c.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    let cards = models["data"].as_array().unwrap();
    assert_eq!(cards.iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(), vec!["smollm2", "a"]);
    assert_eq!(cards[1]["parent"], "smollm2");
    assert_eq!(cards[1]["root"].as_str(), Some(a_dir.to_str().unwrap()));
    assert!(cards[0]["parent"].is_null());

    // A prompt of four full blocks (prefix-cache keys are per block of 16 tokens).
    let prompt = "The history of the lighthouse keepers on the northern coast is long, and every keeper wrote \
                  down the weather, the ships that passed and the state of the lamp in a book that is kept today.";
    let complete = |model: &'static str| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
            let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            (status, v)
        }
    };
    let hits = || {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
            metric(&text, "vllm:prefix_cache_hits_total").expect("prefix hits")
        }
    };
    let text = |v: &serde_json::Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let (s, v) = complete("smollm2").await;
    assert_eq!(s, 200, "{v}");
    let base_text = text(&v);
    let h1 = hits().await;
    let (_, v) = complete("smollm2").await;
    assert_eq!(text(&v), base_text);
    let h2 = hits().await;
    assert!(h2 > h1, "the base model's second request hits the prefix cache ({h1} -> {h2})");
    let (s, v) = complete("a").await;
    assert_eq!(s, 200, "{v}");
    let a_text = text(&v);
    assert_eq!(v["model"], "a");
    assert_eq!(hits().await, h2, "the adapter does not reuse the base model's cached blocks");
    assert_ne!(a_text, base_text, "the adapter changes the greedy text ({base_text:?})");
    let (_, v) = complete("a").await;
    assert_eq!(text(&v), a_text, "the adapter's own cached blocks give the same text");
    assert!(hits().await > h2, "the adapter's second request hits its own cached blocks");
    println!("base: {base_text:?}\nadapter a: {a_text:?}");

    // Load and unload at run time.
    let post = |path: &'static str, body: serde_json::Value| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let r = c.post(format!("{base}{path}")).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let load_b = serde_json::json!({"lora_name": "b", "lora_path": b_dir});
    let (s, t) = post("/v1/load_lora_adapter", load_b.clone()).await;
    assert_eq!(s, 200, "{t}");
    assert!(t.contains("Success"), "{t}");
    let (s, t) = post("/v1/load_lora_adapter", load_b).await;
    assert_eq!(s, 400, "a name already loaded: {t}");
    tessera_tests::assert_openai_error(s, t.as_bytes(), "a second load of b");
    let (s, t) = post("/v1/load_lora_adapter", serde_json::json!({"lora_name": "big", "lora_path": big_dir})).await;
    assert!(s == 400 && t.contains("max-lora-rank"), "rank 32 over --max-lora-rank 16: {s} {t}");
    let (s, t) =
        post("/v1/load_lora_adapter", serde_json::json!({"lora_name": "c", "lora_path": "/nonexistent/c"})).await;
    assert!(s == 400 && t.contains("/nonexistent/c"), "a missing adapter: {s} {t}");
    let (s, t) = post("/v1/load_lora_adapter", serde_json::json!({"lora_name": "d"})).await;
    assert!(s == 400 && t.contains("lora_path"), "no path: {s} {t}");
    let (s, v) = complete("b").await;
    assert_eq!(s, 200, "{v}");
    let b_text = text(&v);
    assert!(b_text != base_text && b_text != a_text, "b is its own adapter: {b_text:?}");

    // While a long request runs on `a`, the metric names it; afterwards nothing runs.
    let body = serde_json::json!({"model": "a", "prompt": prompt, "max_tokens": 200, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let mut stream = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert!(stream.chunk().await.unwrap().is_some_and(|c| c.starts_with(b"data:")), "the stream started");
    // The figures are published after each engine step: poll briefly (the request runs for
    // 200 tokens, far longer).
    let mut m = String::new();
    for _ in 0..100 {
        m = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        if lora_info(&m)["running_lora_adapters"] == "a" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let info = lora_info(&m);
    assert_eq!(info["running_lora_adapters"], "a", "{info:?}");
    assert_eq!(info["max_lora"], "2");
    assert!(metric(&m, "vllm:lora_requests_info").unwrap() > 1.7e9, "valued with the scrape time");
    drop(stream);
    tessera_tests::wait_idle(&running).await;
    let info = lora_info(&c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap());
    assert_eq!((info["running_lora_adapters"].as_str(), info["waiting_lora_adapters"].as_str()), ("", ""));

    let (s, t) = post("/v1/unload_lora_adapter", serde_json::json!({"lora_name": "b"})).await;
    assert_eq!(s, 200, "{t}");
    let (s, _) = complete("b").await;
    assert_eq!(s, 404, "an unloaded adapter is no longer a model");
    let (s, t) = post("/v1/unload_lora_adapter", serde_json::json!({"lora_name": "b"})).await;
    assert_eq!(s, 404, "{t}");
    tessera_tests::assert_openai_error(s, t.as_bytes(), "unloading an unknown adapter");
    // Loaded again under the same name, from a URI this time: a new adapter (nothing cached
    // under the old one is used).
    let uri = format!("file://{}", b_dir.display());
    let (s, t) = post("/v1/load_lora_adapter", serde_json::json!({"lora_name": "b", "lora_path": uri})).await;
    assert_eq!(s, 200, "{t}");
    let (_, v) = complete("b").await;
    assert_eq!(text(&v), b_text);
    running.stop().await.unwrap();
    for d in [&a_dir, &b_dir, &big_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn lora_flags_are_checked() {
    let hf = smollm2_hf();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (flags, want) in [
        (vec!["--lora-modules", "a=/x"], "--enable-lora"),
        (vec!["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "1"], "--max-cpu-loras"),
        (vec!["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "twice"),
        (vec!["--enable-lora", "--lora-modules", "a=/nonexistent/adapter"], "/nonexistent/adapter"),
    ] {
        let e = match rt.block_on(tessera::launch(serve_args(&hf, &flags))) {
            Ok(_) => panic!("{flags:?} should be refused"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{flags:?}: {e}");
    }
}

/// A llama GGUF keeps llama.cpp's q/k row order (rotary pairs adjacent): an adapter, written
/// in Hugging Face order, must be reordered the same way. The GGUF's weights dequantized to
/// f32 with an adapter equal the derived Hugging Face copy with the same adapter (1e-3, the
/// bound the two layouts meet without adapters).
#[test]
fn an_adapter_on_the_gguf_layout_equals_it_on_the_hugging_face_layout() {
    let hf = smollm2_hf();
    let cfg = config(&hf);
    let dir = tmp("layouts");
    write_adapter(&dir, &cfg, 0.02);
    let lm = tessera_loader::open(&tessera_tests::smollm2_gguf(), DType::F32, &Device::Cpu).unwrap();
    assert!(lm.config.rope_interleaved, "the GGUF keeps llama.cpp's layout");
    let dense = tessera_tests::Dequantized(lm.weights);
    let worker = |cfg: &ModelConfig, src: &dyn WeightSource| {
        Worker::new(Llama::load(cfg, src, 256, DType::F32, &Device::Cpu).unwrap(), 48, 4, DType::F32).unwrap()
    };
    let (mut g, mut h) =
        (worker(&lm.config, &dense), worker(&cfg, &SafetensorsSource::open(&hf, DType::F32, &Device::Cpu).unwrap()));
    let toks: Vec<u32> = (0..24).map(|t| 1 + (t * 7919 + 5) % 49_000).collect();
    let with = |w: &mut Worker| run(w, &[(0, toks.clone(), Some(1))], 16, loads(&[(1, "a", &dir)]));
    let (lg, lh) = (with(&mut g), with(&mut h));
    let d = max_diff(&lg, &lh);
    let effect = max_diff(&lh, &run(&mut h, &[(0, toks.clone(), None)], 16, vec![]));
    println!("adapter on the GGUF layout vs the Hugging Face layout: max |Δlogit| = {d:e} (the adapter moves logits by {effect})");
    assert!(effect > 0.1, "{effect}");
    assert!(d < 1e-3, "the adapter on the GGUF layout differs by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}
