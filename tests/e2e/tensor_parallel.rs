//! Tensor and pipeline parallelism on tiny random llamas: the logits of TP = 2 and 4, PP = 2
//! and TP = 2 × PP = 2 (ranks as threads, talking over the CPU TCP back-end) equal TP = 1's
//! within 1e-4, for a prefill of 4 sequences of different lengths and 20 decode steps; KV
//! heads replicated when fewer than ranks; a degree that does not divide the heads is refused
//! naming the numbers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use tessera_loader::SafetensorsSource;
use tessera_models::{Communicator, Llama, ModelConfig, PipelineParallel, TensorParallel};
use tessera_parallel::TcpComm;
use tessera_runner::StepPlan;
use tessera_tests::steps::{max_diff, model_dir, reference, run_parallel, run_tp, worker};
use tessera_tests::tiny::TinyShape;

#[test]
fn tp_2_and_4_equal_tp_1() {
    for (name, shape, worlds) in [
        ("kv4", TinyShape::default(), vec![2, 4]),
        // 2 KV heads on 4 ranks: each KV head is replicated on two ranks.
        ("kv2", TinyShape { kv_heads: 2, vocab: 130, inter: 100, ..TinyShape::default() }, vec![4]),
    ] {
        let dir = model_dir(name, shape);
        let (plans, want) = reference(&dir, shape.vocab);
        assert_eq!(want[0].len(), 4);
        for world in worlds {
            let got = run_tp(&dir, world, &plans);
            let d = max_diff(&got, &want);
            println!("{name}: TP={world} vs TP=1 over {} steps: max |Δlogit| = {d:e}", plans.len());
            assert!(d < 1e-4, "{name}: TP={world} differs by {d}");
            assert_eq!(got.iter().map(Vec::len).sum::<usize>(), want.iter().map(Vec::len).sum::<usize>());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn pp_2_and_tp_2_by_pp_2_equal_tp_1() {
    let shape = TinyShape { layers: 5, ..TinyShape::default() }; // 5 layers: stages of 3 and 2
    let dir = model_dir("pp", shape);
    let (plans, want) = reference(&dir, shape.vocab);
    for (tp, pp) in [(1, 2), (2, 2), (1, 5)] {
        let got = run_parallel(&dir, tp, pp, &plans);
        let d = max_diff(&got, &want);
        println!("TP={tp} x PP={pp} vs TP=1 over {} steps: max |Δlogit| = {d:e}", plans.len());
        assert!(d < 1e-4, "TP={tp} PP={pp} differs by {d}");
        assert_eq!(got.iter().map(Vec::len).sum::<usize>(), want.iter().map(Vec::len).sum::<usize>());
    }
    let group = TcpComm::local_group(1, Device::Cpu).unwrap();
    let world: Arc<dyn Communicator> = Arc::new(group.into_iter().next().unwrap());
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open(&dir, DType::F32, &Device::Cpu).unwrap();
    let e = Llama::load_pipelined(
        &cfg,
        &src,
        64,
        DType::F32,
        &Device::Cpu,
        TensorParallel::single(),
        PipelineParallel::new(world, 0, 6, 1),
    )
    .expect_err("6 stages for 5 layers")
    .to_string();
    assert!(e.contains("pipeline parallel size 6") && e.contains("5 layers"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ranks of one group with expert parallelism on (experts split whole over the ranks).
fn run_ep(dir: &Path, world: usize, plans: &[StepPlan]) -> Vec<Vec<Vec<f32>>> {
    let group = TcpComm::local_group(world, Device::Cpu).expect("rank group");
    let handles: Vec<_> = group
        .into_iter()
        .map(|comm| {
            let (dir, plans) = (dir.to_path_buf(), plans.to_vec());
            std::thread::spawn(move || {
                let tp = TensorParallel::new(Arc::new(comm)).with_expert_parallel(true);
                let mut w = worker(&dir, tp);
                plans.iter().map(|p| w.forward_logits(p).unwrap().to_vec2::<f32>().unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut outs: Vec<Vec<Vec<Vec<f32>>>> = handles.into_iter().map(|h| h.join().expect("rank thread")).collect();
    for (r, o) in outs.iter().enumerate().skip(1) {
        assert_eq!(o, &outs[0], "rank {r} sees the same logits as rank 0");
    }
    outs.swap_remove(0)
}

#[test]
fn moe_ep_2_and_4_and_sliced_experts_equal_one_rank() {
    let shape = TinyShape { experts: 8, top_k: 2, ..TinyShape::default() };
    let dir = model_dir("moe", shape);
    let (plans, want) = reference(&dir, shape.vocab);
    for world in [2, 4] {
        let got = run_ep(&dir, world, &plans);
        let d = max_diff(&got, &want);
        println!("MoE EP={world} vs 1 rank over {} steps: max |Δlogit| = {d:e}", plans.len());
        assert!(d < 1e-4, "EP={world} differs by {d}");
    }
    // One sequence: a single decode token, so some ranks get no tokens to route.
    let single: Vec<StepPlan> =
        plans.iter().map(|p| StepPlan { seqs: vec![p.seqs[0].clone()], lora_ops: vec![] }).collect();
    let mut w1 = worker(&dir, TensorParallel::single());
    let want1: Vec<Vec<Vec<f32>>> =
        single.iter().map(|p| w1.forward_logits(p).unwrap().to_vec2::<f32>().unwrap()).collect();
    let d = max_diff(&run_ep(&dir, 4, &single), &want1);
    assert!(d < 1e-4, "EP=4 on one sequence differs by {d}");
    let got = run_tp(&dir, 2, &plans);
    let d = max_diff(&got, &want);
    println!("MoE TP=2 (experts sliced) vs 1 rank: max |Δlogit| = {d:e}");
    assert!(d < 1e-4, "TP=2 MoE differs by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Data-parallel expert parallelism: `dp` replicas of `tp` ranks, experts split over all
/// `dp × tp`. Replica `r` idles for `r * lag` steps (serving its experts to the others with
/// idle passes), runs every plan, then idles until all are done: busy/idle, busy/busy on
/// different plans and idle/busy all occur. Returns each replica's rank-0 logits per plan.
fn run_dp_ep(dir: &Path, dp: usize, tp: usize, lag: usize, plans: &[StepPlan]) -> Vec<Vec<Vec<Vec<f32>>>> {
    let ticks = plans.len() + (dp - 1) * lag;
    let mut experts = TcpComm::local_group(dp * tp, Device::Cpu).expect("expert group").into_iter();
    let mut handles = Vec::new();
    for r in 0..dp {
        for (t, tp_comm) in TcpComm::local_group(tp, Device::Cpu).expect("tensor group").into_iter().enumerate() {
            let exp = experts.next().expect("an expert rank per tensor rank");
            let (dir, plans) = (dir.to_path_buf(), plans.to_vec());
            handles.push((
                (r, t),
                std::thread::spawn(move || {
                    let group = TensorParallel::new(Arc::new(tp_comm)).with_expert_group(Arc::new(exp));
                    let mut w = worker(&dir, group);
                    let mut out = Vec::new();
                    for tick in 0..ticks {
                        match tick.checked_sub(r * lag).and_then(|i| plans.get(i)) {
                            Some(p) => out.push(w.forward_logits(p).unwrap().to_vec2::<f32>().unwrap()),
                            None => w.idle_pass().expect("idle pass"),
                        }
                    }
                    out
                }),
            ));
        }
    }
    let mut per_replica = vec![Vec::new(); dp];
    for ((r, t), h) in handles {
        let out = h.join().expect("rank thread");
        if t == 0 {
            per_replica[r] = out;
        } else {
            assert_eq!(out, per_replica[r], "tensor rank {t} of replica {r} sees rank 0's logits");
        }
    }
    per_replica
}

#[test]
fn moe_data_parallel_expert_groups_equal_one_rank_with_idle_replicas() {
    let shape = TinyShape { experts: 8, top_k: 2, ..TinyShape::default() };
    let dir = model_dir("dp-ep", shape);
    let (plans, want) = reference(&dir, shape.vocab);
    for (dp, tp, lag) in [(2, 1, 5), (2, 2, 3), (4, 1, 2)] {
        let got = run_dp_ep(&dir, dp, tp, lag, &plans);
        for (r, g) in got.iter().enumerate() {
            assert_eq!(g.len(), plans.len(), "replica {r} ran every plan");
            let d = max_diff(g, &want);
            println!("MoE DP={dp} x TP={tp} expert group of {}: replica {r} max |Δlogit| = {d:e}", dp * tp);
            assert!(d < 1e-4, "DP={dp} TP={tp} replica {r} differs by {d}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_degree_that_does_not_divide_the_heads_is_refused() {
    let shape = TinyShape::default();
    let dir = model_dir("bad", shape);
    let group = TcpComm::local_group(3, Device::Cpu).unwrap();
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open(&dir, DType::F32, &Device::Cpu).unwrap();
    let comm = group.into_iter().next().unwrap();
    let e = Llama::load_parallel(&cfg, &src, 64, DType::F32, &Device::Cpu, TensorParallel::new(Arc::new(comm)))
        .expect_err("TP=3 cannot split 8 heads")
        .to_string();
    assert!(e.contains("tensor parallel size 3") && e.contains("8 attention heads"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Threads of this process named like follower ranks (`tessera-rank-N`).
fn rank_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("tessera-rank-"))
                })
                .count()
        })
        .unwrap_or(0)
}

async fn greedy_texts(model: &Path, extra: &[&str]) -> Vec<String> {
    let before = rank_threads();
    let running = tessera::launch(tessera_tests::serve_args(model, extra)).await.expect("worker");
    let ranks = tessera::args::normalize_argv(extra.iter().map(|s| s.to_string()));
    let degree = |flag: &str| ranks.iter().position(|a| a == flag).map_or(1, |i| ranks[i + 1].parse().unwrap_or(1));
    let want = degree("--tensor-parallel-size") * degree("--pipeline-parallel-size") - 1;
    assert_eq!(rank_threads() - before, want, "{extra:?} runs {want} follower rank threads");
    let c = reqwest::Client::new();
    let mut out = Vec::new();
    for p in [
        "The capital of France is",
        "Once upon a time, there was a little",
        "def fibonacci(n):",
        "The three primary colors are",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ] {
        let body = serde_json::json!({"model": "smollm2", "prompt": p, "max_tokens": 16, "temperature": 0});
        let v: serde_json::Value = c
            .post(format!("http://{}/v1/completions", running.addr))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{v}")).to_string());
    }
    running.stop().await.expect("stop");
    // Stopping the worker ends its rank threads too.
    let t = std::time::Instant::now();
    while rank_threads() > before {
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "rank threads outlive the worker");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_tp3_serves_the_same_greedy_text_and_tp2_is_refused() {
    // The f32 safetensors copy: TP only reorders float sums, so greedy text must not change.
    let hf = tessera_tests::smollm2_hf();
    let single = greedy_texts(&hf, &[]).await;
    let tp3 = greedy_texts(&hf, &["--tensor-parallel-size", "3"]).await;
    for (a, b) in single.iter().zip(&tp3) {
        println!("TP=1 {a:?}\nTP=3 {b:?}");
    }
    assert_eq!(tp3, single, "TP=3 greedy text equals TP=1's");
    let pp2 = greedy_texts(&hf, &["--pipeline-parallel-size", "2"]).await;
    assert_eq!(pp2, single, "PP=2 greedy text equals TP=1's");
    // The Q4_1 GGUF shards block-exactly and serves; its CPU kernels re-quantize activations
    // per 32 values, so reordered sums can flip a rounding and texts may part late.
    let gguf = tessera_tests::smollm2_gguf();
    let (q1, q3) = (greedy_texts(&gguf, &[]).await, greedy_texts(&gguf, &["-tp", "3"]).await);
    for (a, b) in q1.iter().zip(&q3) {
        println!("GGUF TP=1 {a:?}\nGGUF TP=3 {b:?}");
        let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
        assert!(common >= 8, "GGUF TP=3 agrees with TP=1 at the start: {a:?} vs {b:?}");
    }
    let e =
        tessera::launch(tessera_tests::serve_args(&tessera_tests::smollm2_gguf(), &["--tensor-parallel-size", "2"]))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    assert!(e.contains("tensor parallel size 2") && e.contains("9 attention heads"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_replicas_share_the_load_behind_one_front() {
    let (running, base) = tessera_tests::start_smollm2(&["--data-parallel-size", "2"]).await;
    let c = tessera_tests::client();
    let body =
        serde_json::json!({"model": "smollm2", "prompt": "Tell me a story", "max_tokens": 8, "ignore_eos": true});
    let reqs: Vec<_> = (0..8).map(|_| c.post(format!("{base}/v1/completions")).json(&body).send()).collect();
    for r in futures::future::join_all(reqs).await {
        assert_eq!(r.expect("response").status(), 200);
    }
    let m = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let per_engine: Vec<f64> = (0..2)
        .map(|e| {
            m.lines()
                .find(|l| l.starts_with("vllm:generation_tokens_total") && l.contains(&format!("engine=\"{e}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("engine {e} missing:\n{m}"))
        })
        .collect();
    println!("data parallel: generation tokens per replica {per_engine:?}");
    assert_eq!(per_engine.iter().sum::<f64>(), 64.0);
    assert!(per_engine.iter().all(|&n| n > 0.0), "both replicas served: {per_engine:?}");
    running.stop().await.expect("stop");
    for (flags, want) in [
        (&["--data-parallel-size", "4", "--data-parallel-size-local", "3"][..], "must divide --data-parallel-size 4"),
        (&["--data-parallel-size", "2", "--data-parallel-start-rank", "1"][..], "must be a multiple of"),
        (
            &["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1"][..],
            "needs --data-parallel-address",
        ),
    ] {
        let e = tessera::launch(tessera_tests::serve_args(&tessera_tests::smollm2_gguf(), flags))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(want), "{flags:?}: {e}");
    }
}

/// A tiny random MoE carrying SmolLM2's tokenizer, so it serves HTTP.
fn tiny_moe_servable() -> PathBuf {
    let shape = TinyShape { vocab: 49152, experts: 8, top_k: 2, ..TinyShape::default() };
    let dir = model_dir("moe-http", shape);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tessera_tests::smollm2_hf().join(f), dir.join(f)).expect("tokenizer files");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_expert_parallel_serves_the_single_rank_text_under_concurrency() {
    let dir = tiny_moe_servable();
    let prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "2 + 2 ="];
    let texts = |extra: &'static [&'static str]| {
        let dir = dir.clone();
        async move {
            let running = tessera::launch(tessera_tests::serve_args(&dir, extra)).await.expect("worker");
            let c = tessera_tests::client();
            // All at once (both replicas busy, then one idle while the other finishes).
            let answers = futures::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
                let body = serde_json::json!({"model": "smollm2", "prompt": p, "max_tokens": 6 + 4 * i,
                    "temperature": 0, "ignore_eos": true});
                let req = c.post(format!("http://{}/v1/completions", running.addr)).json(&body).send();
                async move {
                    let v: serde_json::Value = req.await.expect("response").json().await.expect("json");
                    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{v}")).to_string()
                }
            }))
            .await;
            // An idle pause (the replicas keep meeting), then one more request.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let body = serde_json::json!({"model": "smollm2", "prompt": prompts[0], "max_tokens": 6, "temperature": 0});
            let v: serde_json::Value = c
                .post(format!("http://{}/v1/completions", running.addr))
                .json(&body)
                .send()
                .await
                .expect("response")
                .json()
                .await
                .expect("json");
            let again = v["choices"][0]["text"].as_str().unwrap_or_default().to_string();
            let m = c.get(format!("http://{}/metrics", running.addr)).send().await.unwrap().text().await.unwrap();
            let busy = m
                .lines()
                .filter(|l| l.starts_with("vllm:generation_tokens_total{"))
                .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|n| n > 0.0))
                .count();
            running.stop().await.expect("stop");
            (answers, again, busy)
        }
    };
    let (single, single_again, _) = texts(&["--max-model-len", "512"]).await;
    let dp_ep_flags = &[
        "--max-model-len",
        "512",
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
        "--tensor-parallel-size",
        "2",
    ];
    let (dp_ep, dp_ep_again, busy) = texts(dp_ep_flags).await;
    assert_eq!(busy, 2, "both replicas generated");
    println!("one rank: {single:?}\nDP=2 x TP=2, experts over 4 ranks: {dp_ep:?}");
    assert_eq!(dp_ep, single, "data-parallel expert parallelism serves the single-rank greedy text");
    assert_eq!(dp_ep_again, single_again);
    let _ = std::fs::remove_dir_all(&dir);
}
