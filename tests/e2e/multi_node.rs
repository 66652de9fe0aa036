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
    let dir = std::env::temp_dir().join(format!("tessera-lws-{}-{name}", std::process::id()));
    let s = TinyShape { vocab: 49152, ..TinyShape::default() };
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
