//! Ranks in separate processes: a 2-pod LeaderWorkerSet emulated on loopback (the test sets
//! `LWS_*` as the LWS controller would), a rank killed mid-serving, and a rank that never joins.
//! The model is a tiny random llama carrying SmolLM2's tokenizer, so it can serve HTTP.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::tiny::{tiny_weights, write_hf, TinyShape};
use tessera_tests::{free_port, smollm2_hf, WorkerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_tessera-worker");

fn tiny_servable(name: &str) -> PathBuf {
    tiny_servable_shaped(name, TinyShape { vocab: 49152, ..TinyShape::default() })
}

fn tiny_servable_shaped(name: &str, s: TinyShape) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-lws-{}-{name}", std::process::id()));
    write_hf(&dir, s, &tiny_weights(s), 1);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(smollm2_hf().join(f), dir.join(f)).expect("tokenizer files");
    }
    dir
}

fn lws_env(port: &str, index: &str) -> Vec<(String, String)> {
    vec![
        ("LWS_LEADER_ADDRESS".into(), "127.0.0.1".into()),
        ("LWS_GROUP_SIZE".into(), "2".into()),
        ("LWS_WORKER_INDEX".into(), index.into()),
        ("TESSERA_RENDEZVOUS_PORT".into(), port.into()),
    ]
}

/// The worker pod: `tessera serve` with the same flags; it serves no HTTP.
fn start_worker_pod(model: &Path, port: &str, log: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["serve", model.to_str().unwrap(), "--tensor-parallel-size", "2", "--max-model-len", "256"])
        .envs(lws_env(port, "1"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start the worker pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pod_group_serves_and_a_killed_rank_fails_fast() {
    let model = tiny_servable("group");
    let port = free_port().to_string();
    let wlog = std::env::temp_dir().join(format!("tessera-lws-worker-{port}.log"));
    let mut worker = start_worker_pod(&model, &port, &wlog);
    let env = lws_env(&port, "0");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let leader =
        WorkerProcess::start_with_env(BIN, &model, &["--tensor-parallel-size", "2", "--max-model-len", "256"], &env)
            .await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let body = json!({"model": "smollm2", "prompt": "Hello", "max_tokens": 8, "ignore_eos": true, "temperature": 0});
    let r = c.post(format!("{}/v1/completions", leader.base)).json(&body).send().await.expect("response");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], json!(8), "{v}");

    // Kill the worker pod's rank: the next request fails promptly and /health turns 503.
    worker.kill().expect("kill the worker pod");
    let _ = worker.wait();
    let t = Instant::now();
    let r = c.post(format!("{}/v1/completions", leader.base)).json(&body).send().await.expect("an answer, not a hang");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    assert!(status >= 500, "the request fails: {status} {text}");
    assert!(text.contains("rank 1"), "the error names the rank: {text}");
    let health = c.get(format!("{}/health", leader.base)).send().await.unwrap().status();
    assert_eq!(health, 503);
    println!("killed rank: request failed in {:?} with {status}: {text}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(leader.log_text().contains("rank 1 disconnected"), "{}", leader.log_text());
    let _ = std::fs::remove_dir_all(&model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_never_joins_fails_start_up_naming_it() {
    let model = tiny_servable("alone");
    let port = free_port().to_string();
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["serve", model.to_str().unwrap(), "--tensor-parallel-size", "2", "--port", &free_port().to_string()])
        .args(["--max-model-len", "256", "--rank-join-timeout", "2"])
        .envs(lws_env(&port, "0"))
        .output()
        .expect("run the leader");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "start-up fails");
    assert!(err.contains("ranks [1] of 2 never joined"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "within the timeout, not a hang: {:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&model);
}

/// KServe's data-parallel preset: `--data-parallel-size 2 --data-parallel-size-local 1`, one
/// replica per pod (each with tensor parallel 2 inside the pod), the second pod `--headless`.
fn dp_flags(rpc: &str, start: &str) -> Vec<String> {
    let f = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1"];
    let mut v: Vec<String> = f.iter().map(|s| s.to_string()).collect();
    v.extend(["--data-parallel-rpc-port", rpc, "--data-parallel-start-rank", start].map(String::from));
    v.extend(["--tensor-parallel-size", "2", "--max-model-len", "512"].map(String::from));
    v
}

fn dp_env(index: &str) -> Vec<(&'static str, String)> {
    vec![("LWS_LEADER_ADDRESS", "127.0.0.1".into()), ("LWS_GROUP_SIZE", "2".into()), ("LWS_WORKER_INDEX", index.into())]
}

/// Sum of a counter's samples for one `engine` label.
fn engine_sum(metrics: &str, name: &str, engine: &str) -> f64 {
    let tag = format!("engine=\"{engine}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&tag))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_replicas_on_two_pods_share_the_load_and_a_lost_pod_fails_its_requests() {
    let model = tiny_servable("dp");
    let rpc = free_port().to_string();
    let wlog = std::env::temp_dir().join(format!("tessera-dp-worker-{rpc}.log"));
    let mut worker = Command::new(BIN)
        .args(["serve", model.to_str().unwrap(), "--headless"])
        .args(dp_flags(&rpc, "1"))
        .envs(dp_env("1"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&wlog).unwrap())
        .spawn()
        .expect("start the worker pod");
    let flags = dp_flags(&rpc, "0");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let env = dp_env("0");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let leader = WorkerProcess::start_with_env(BIN, &model, &flags, &env).await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let url = format!("{}/v1/completions", leader.base);

    // Concurrent greedy requests spread over both replicas and agree.
    let body =
        json!({"model": "smollm2", "prompt": "Hello there", "max_tokens": 12, "ignore_eos": true, "temperature": 0});
    let answers = futures::future::join_all((0..6).map(|_| {
        let (c, url, body) = (c.clone(), url.clone(), body.clone());
        async move {
            let v: serde_json::Value = c.post(url).json(&body).send().await.expect("response").json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], json!(12), "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    }))
    .await;
    assert!(answers.iter().all(|a| a == &answers[0]), "replicas agree: {answers:?}");
    // The remote replica's figures reach the leader's /metrics within a stats interval.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = c.get(format!("{}/metrics", leader.base)).send().await.unwrap().text().await.unwrap();
    let served: Vec<f64> = ["0", "1"].iter().map(|e| engine_sum(&metrics, "vllm:request_success_total", e)).collect();
    println!("requests served per data-parallel rank: {served:?}");
    assert_eq!(served.iter().sum::<f64>(), 6.0, "{metrics}");
    assert!(served.iter().all(|&n| n > 0.0), "both replicas served: {served:?}");

    // Two long streams, one per replica (the second goes to the less loaded one); kill the
    // worker pod once both have started: its stream ends with an error naming the rank.
    let long = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 480, "ignore_eos": true, "stream": true});
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut r = c.post(&url).json(&long).send().await.expect("stream");
        let first = r.chunk().await.expect("first chunk").expect("a chunk");
        streams.push((r, String::from_utf8_lossy(&first).to_string()));
    }
    worker.kill().expect("kill the worker pod");
    let _ = worker.wait();
    let t = Instant::now();
    let mut ends = Vec::new();
    for (mut r, mut text) in streams {
        while let Ok(Some(b)) = r.chunk().await {
            text.push_str(&String::from_utf8_lossy(&b));
        }
        ends.push(text);
    }
    println!("after the kill both streams ended within {:?}", t.elapsed());
    let failed: Vec<&String> = ends.iter().filter(|t| t.contains("\"error\"")).collect();
    assert_eq!(failed.len(), 1, "exactly the remote replica's stream fails: {ends:?}");
    assert!(failed[0].contains("data-parallel rank 1"), "the error names the rank: {}", failed[0]);
    assert!(ends.iter().all(|t| t.trim_end().ends_with("data: [DONE]")), "every stream is closed properly");
    let health = c.get(format!("{}/health", leader.base)).send().await.unwrap().status();
    assert_eq!(health, 503, "a lost replica turns /health to 503");
    assert!(leader.log_text().contains("data-parallel rank 1 disconnected"), "{}", leader.log_text());
    let _ = std::fs::remove_dir_all(&model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_parallel_pod_that_never_joins_fails_start_up_naming_its_rank() {
    let model = tiny_servable("dp-alone");
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["serve", model.to_str().unwrap(), "--port", &free_port().to_string(), "--rank-join-timeout", "2"])
        .args(dp_flags(&free_port().to_string(), "0"))
        .envs(dp_env("0"))
        .output()
        .expect("run the leader");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "start-up fails");
    assert!(err.contains("data-parallel ranks [1] never connected"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "bounded by the timeout: {:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_expert_parallel_over_two_pods_serves_the_single_rank_text() {
    let model = tiny_servable_shaped("dp-ep", TinyShape { vocab: 49152, experts: 8, top_k: 2, ..TinyShape::default() });
    let (rpc, rdv) = (free_port().to_string(), free_port().to_string());
    let with_ep = |start: &str| {
        let mut f = dp_flags(&rpc, start);
        f.extend(["--enable-expert-parallel", "--rendezvous-port", &rdv].map(String::from));
        f
    };
    let wlog = std::env::temp_dir().join(format!("tessera-dp-ep-worker-{rpc}.log"));
    let mut worker = Command::new(BIN)
        .args(["serve", model.to_str().unwrap(), "--headless"])
        .args(with_ep("1"))
        .envs(dp_env("1"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&wlog).unwrap())
        .spawn()
        .expect("start the worker pod");
    let flags = with_ep("0");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let env = dp_env("0");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let leader = WorkerProcess::start_with_env(BIN, &model, &flags, &env).await;
    let single = WorkerProcess::start(BIN, &model, &["--max-model-len", "512"]).await;
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let ask = |base: String, p: usize| {
        let c = c.clone();
        async move {
            let body = json!({"model": "smollm2", "prompt": format!("Prompt {p}:"), "max_tokens": 10,
                "ignore_eos": true, "temperature": 0});
            let v: serde_json::Value = c
                .post(format!("{base}/v1/completions"))
                .json(&body)
                .send()
                .await
                .expect("answer")
                .json()
                .await
                .unwrap();
            v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{v}")).to_string()
        }
    };
    let got = futures::future::join_all((0..4).map(|p| ask(leader.base.clone(), p))).await;
    let want = futures::future::join_all((0..4).map(|p| ask(single.base.clone(), p))).await;
    assert_eq!(got, want, "experts over 4 ranks in 2 pods give the single-rank greedy text");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = c.get(format!("{}/metrics", leader.base)).send().await.unwrap().text().await.unwrap();
    let served: Vec<f64> = ["0", "1"].iter().map(|e| engine_sum(&metrics, "vllm:generation_tokens_total", e)).collect();
    println!("DP=2 over pods, experts over 4 ranks: generation tokens per replica {served:?}");
    assert!(served.iter().all(|&n| n > 0.0), "both replicas generated: {served:?}");
    assert!(leader.log_text().contains("experts split over 4 ranks"), "{}", leader.log_text());
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = std::fs::remove_dir_all(&model);
}

/// Prefill/decode between two 2-pod groups (tensor parallel 2, one rank per pod): the leaders
/// move every rank's KV through their executors (the worker pods' ranks answer over the
/// group's links), and the decode group answers like a monolithic TP = 2 worker, computing
/// only the last prompt token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_groups_spanning_pods_move_kv_rank_by_rank() {
    let model = tiny_servable("pd");
    let kv = |role: &str| {
        format!(r#"{{"kv_connector":"TesseraConnector","kv_role":"{role}","kv_ip":"127.0.0.1","kv_port":0}}"#)
    };
    let group = |role: &'static str| {
        let (model, kv) = (model.clone(), kv(role));
        async move {
            let port = free_port().to_string();
            let flags = ["--tensor-parallel-size", "2", "--max-model-len", "256", "--kv-transfer-config", kv.as_str()];
            let wlog = std::env::temp_dir().join(format!("tessera-lws-pd-{role}-{port}.log"));
            let worker = Command::new(BIN)
                .arg("serve")
                .arg(&model)
                .args(flags)
                .envs(lws_env(&port, "1"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&wlog).unwrap())
                .spawn()
                .expect("start the worker pod");
            let env = lws_env(&port, "0");
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let leader = WorkerProcess::start_with_env(BIN, &model, &flags, &env).await;
            (leader, worker, wlog)
        }
    };
    let (prefill, pw, plog) = group("kv_producer").await;
    let (decode, dw, dlog) = group("kv_consumer").await;
    let mono =
        tessera::launch(tessera_tests::serve_args(&model, &["--tensor-parallel-size", "2", "--max-model-len", "256"]))
            .await
            .expect("monolithic worker");
    let m = format!("http://{}", mono.addr);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let metric = |base: String| {
        let c = c.clone();
        async move {
            let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
            tessera_tests::metric(&text, "tessera:prompt_tokens_computed_total").unwrap_or(-1.0)
        }
    };
    for prompt in ["one two three four five six seven eight nine ten eleven twelve", "Hello there, friend"] {
        let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 8, "ignore_eos": true, "temperature": 0});
        let want: serde_json::Value =
            c.post(format!("{m}/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
        let mut leg = body.clone();
        leg["max_tokens"] = json!(1);
        leg["kv_transfer_params"] = json!({"do_remote_decode": true});
        let first: serde_json::Value =
            c.post(format!("{}/v1/completions", prefill.base)).json(&leg).send().await.unwrap().json().await.unwrap();
        assert_eq!(first["kv_transfer_params"]["tp_size"], 2, "{first}");
        let mut second = body.clone();
        second["kv_transfer_params"] = first["kv_transfer_params"].clone();
        let before = metric(decode.base.clone()).await;
        let got: serde_json::Value =
            c.post(format!("{}/v1/completions", decode.base)).json(&second).send().await.unwrap().json().await.unwrap();
        assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"], "{prompt}: {got}\n{}", decode.log_text());
        assert_eq!(metric(decode.base.clone()).await - before, 1.0, "{prompt}: {}", decode.log_text());
    }
    mono.stop().await.expect("stop");
    for (mut leader, mut worker, log) in [(prefill, pw, plog), (decode, dw, dlog)] {
        let _ = leader.child.kill();
        let _ = worker.kill();
        let _ = worker.wait();
        let _ = std::fs::remove_file(log);
    }
    let _ = std::fs::remove_dir_all(&model);
}
