//! End-to-end: a whole worker on the real SmolLM2 GGUF, started in-process on port 0 and
//! driven over HTTP.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::{client, sse_events, start_smollm2 as start};

fn chat_body(content: &str, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 24,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// Concatenate the content deltas of a chat SSE stream; returns (text, usage, finish_reason).
fn chat_stream_text(events: &[String]) -> (String, Value, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream ends with [DONE]");
    let (mut text, mut usage, mut finish) = (String::new(), Value::Null, String::new());
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk is JSON");
        assert!(v.get("error").is_none(), "error event: {v}");
        if let Some(c) = v["choices"].get(0) {
            if let Some(s) = c["delta"]["content"].as_str() {
                text.push_str(s);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    (text, usage, finish)
}

async fn wait_pool_full(running: &tessera::Running) {
    let engine = running.state.engine_stats().expect("model attached");
    for _ in 0..200 {
        if engine.free_blocks.load(Ordering::Relaxed) == engine.num_blocks {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("KV blocks leaked: {} of {} free", engine.free_blocks.load(Ordering::Relaxed), engine.num_blocks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_json_and_stream_agree() {
    let (running, base) = start(&[]).await;
    let c = client();
    assert_eq!(c.get(format!("{base}/health")).send().await.unwrap().status(), 200);
    let q = "What is the capital of France?";
    let r: Value = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_body(q, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = r["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    assert!(!text.trim().is_empty(), "the model answered: {text:?}");
    assert_eq!(r["object"], "chat.completion");
    let resp = c.post(format!("{base}/v1/chat/completions")).json(&chat_body(q, true)).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (streamed, usage, finish) = chat_stream_text(&sse_events(resp).await);
    assert_eq!(streamed, text, "streaming and non-streaming agree at temperature 0");
    assert_eq!(usage, r["usage"], "usage chunk matches the JSON usage");
    assert_eq!(finish, r["choices"][0]["finish_reason"].as_str().unwrap());
    wait_pool_full(&running).await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_streams_are_batched_and_free_every_block() {
    let (running, base) = start(&[]).await;
    let c = client();
    let prompts: Vec<String> = (0..32).map(|i| format!("Write one sentence about the number {i}.")).collect();
    // Reference answers, one at a time.
    let mut solo = Vec::new();
    for p in prompts.iter().take(4) {
        let r = c.post(format!("{base}/v1/chat/completions")).json(&chat_body(p, true)).send().await.unwrap();
        solo.push(chat_stream_text(&sse_events(r).await).0);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (c, url, body) = (c.clone(), format!("{base}/v1/chat/completions"), chat_body(p, true));
            tokio::spawn(async move { sse_events(c.post(url).json(&body).send().await.unwrap()).await })
        })
        .collect();
    let mut texts = Vec::new();
    for t in tasks {
        let (text, usage, finish) = chat_stream_text(&t.await.unwrap());
        assert!(!text.is_empty());
        assert!(finish == "stop" || finish == "length", "finish_reason {finish}");
        assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);
        texts.push(text);
    }
    // Batching does not change greedy answers.
    assert_eq!(texts[..4], solo[..], "batched greedy output equals one-at-a-time output");
    let stats = running.state.engine_stats().unwrap();
    let max_batch = stats.max_batch.load(Ordering::Relaxed);
    assert!(max_batch > 8, "the engine batched (largest step had {max_batch} sequences)");
    assert!(stats.batched_steps.load(Ordering::Relaxed) > 0);
    wait_pool_full(&running).await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_seed_prefix_cache_models_metrics_and_errors() {
    let (running, base) = start(&[]).await;
    let c = client();
    let url = format!("{base}/v1/completions");
    let body = |seed: u64| json!({"model": "smollm2", "prompt": "Once upon a time, in a land far away, there lived a", "temperature": 1.0, "max_tokens": 16, "seed": seed});
    let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let a = text(c.post(&url).json(&body(7)).send().await.unwrap().json().await.unwrap());
    let b = text(c.post(&url).json(&body(7)).send().await.unwrap().json().await.unwrap());
    let d = text(c.post(&url).json(&body(8)).send().await.unwrap().json().await.unwrap());
    assert!(!a.is_empty(), "sampled text is empty");
    assert_eq!(a, b, "same seed, same text");
    assert_ne!(a, d, "another seed, another text");

    // A repeated long prefix is served from the prefix cache.
    let stats = running.state.engine_stats().unwrap();
    let hits0 = stats.prefix_hits.load(Ordering::Relaxed);
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(10);
    for _ in 0..2 {
        let r = c
            .post(&url)
            .json(&json!({"model": "smollm2", "prompt": long, "max_tokens": 2, "temperature": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let hits = stats.prefix_hits.load(Ordering::Relaxed) - hits0;
    assert!(hits >= 96, "second request reused its prefix ({hits} tokens hit)");

    let models: Value = c.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
    ] {
        assert!(metrics.contains(name), "metric {name} missing:\n{metrics}");
    }

    // Errors are OpenAI-shaped.
    for (body, status, param) in [
        (json!({"model": "nope", "prompt": "x"}), 404, Some("model")),
        (json!({"model": "smollm2", "prompt": "x", "temperature": -1}), 400, Some("temperature")),
        (json!({"model": "smollm2", "prompt": "x", "max_tokens": 100000}), 400, None),
        (json!({"model": "smollm2"}), 400, None),
    ] {
        let r = c.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    }
    let r = c.post(&url).body("{not json").header("content-type", "application/json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    wait_pool_full(&running).await;
    running.stop().await.unwrap();
}

/// A KV cache too small for all requests at once: sequences are preempted and recomputed,
/// every request still completes with its full length, and every block comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preemption_under_a_small_cache_loses_nothing() {
    // 0.35 MiB per 16-token block for SmolLM2 in the default f16 cache: 10 MiB = 28 blocks =
    // 448 tokens, while 8 requests of ~10 + 64 tokens need ~600.
    let (running, base) = start(&["--kv-cache-memory", "10MiB", "--max-model-len", "256"]).await;
    let c = client();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            let url = format!("{base}/v1/completions");
            let body = json!({"model": "smollm2", "prompt": format!("List of facts about the number {i}:"),
                "max_tokens": 64, "temperature": 0, "ignore_eos": true, "stop": []});
            tokio::spawn(async move { c.post(url).json(&body).send().await.unwrap().json::<Value>().await.unwrap() })
        })
        .collect();
    for t in tasks {
        let v = t.await.unwrap();
        let finish = v["choices"][0]["finish_reason"].as_str().unwrap_or_default().to_string();
        let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        assert!(finish == "length" && n == 64 || finish == "stop" && n >= 1, "{v}");
    }
    let stats = running.state.engine_stats().unwrap();
    assert!(stats.preemptions.load(Ordering::Relaxed) > 0, "the small cache forced preemption");
    wait_pool_full(&running).await;
    running.stop().await.unwrap();
}
