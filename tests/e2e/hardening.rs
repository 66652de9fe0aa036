//! Behaviour under bad input, overload, disconnects, priority and shutdown, on the real
//! SmolLM2 worker over loopback HTTP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tessera_tests::{
    assert_openai_error, client, metric, smollm2_gguf, start_smollm2 as start, wait_idle, WorkerProcess,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_adversarial_bodies_get_openai_4xx() {
    let (running, base) = start(&["--max-model-len", "96"]).await;
    let c = client();
    let chat = format!("{base}/v1/chat/completions");
    let cmpl = format!("{base}/v1/completions");
    let msg = json!([{"role": "user", "content": "hi"}]);
    let big = "word ".repeat(200_000); // 1 MB prompt
    let nested = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let mut cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("empty body", chat.clone(), vec![]),
        ("not json", chat.clone(), b"hello".to_vec()),
        ("json array", chat.clone(), b"[1,2]".to_vec()),
        ("json null", cmpl.clone(), b"null".to_vec()),
        (
            "invalid utf-8",
            chat.clone(),
            b"{\"model\":\"smollm2\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(),
        ),
        ("deeply nested", chat.clone(), nested.clone().into_bytes()),
        ("nested in a field", cmpl.clone(), format!("{{\"model\":\"smollm2\",\"prompt\":{nested}}}").into_bytes()),
        ("truncated", chat.clone(), b"{\"model\":\"smollm2\",\"messages\":[".to_vec()),
    ];
    let json_cases: Vec<(&str, &String, Value)> = vec![
        ("no model", &chat, json!({"messages": msg})),
        ("messages wrong type", &chat, json!({"model": "smollm2", "messages": "hi"})),
        ("empty messages", &chat, json!({"model": "smollm2", "messages": []})),
        ("unknown role", &chat, json!({"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]})),
        ("content wrong type", &chat, json!({"model": "smollm2", "messages": [{"role": "user", "content": 5}]})),
        (
            "image part",
            &chat,
            json!({"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ),
        ("max_tokens string", &chat, json!({"model": "smollm2", "messages": msg, "max_tokens": "ten"})),
        ("negative max_tokens", &chat, json!({"model": "smollm2", "messages": msg, "max_tokens": -5})),
        ("zero max_tokens in chat", &chat, json!({"model": "smollm2", "messages": msg, "max_tokens": 0})),
        ("negative completions max_tokens", &cmpl, json!({"model": "smollm2", "prompt": "a", "max_tokens": -1})),
        ("huge max_tokens", &cmpl, json!({"model": "smollm2", "prompt": "a", "max_tokens": 1e30})),
        ("u64 overflow", &cmpl, json!({"model": "smollm2", "prompt": "a", "max_tokens": 18446744073709551615u64})),
        ("max_tokens beyond context", &cmpl, json!({"model": "smollm2", "prompt": "a", "max_tokens": 5000})),
        ("huge temperature", &chat, json!({"model": "smollm2", "messages": msg, "temperature": 1e308})),
        ("top_p zero", &chat, json!({"model": "smollm2", "messages": msg, "top_p": 0})),
        ("n zero", &chat, json!({"model": "smollm2", "messages": msg, "n": 0})),
        ("n huge", &chat, json!({"model": "smollm2", "messages": msg, "n": 1_000_000_000})),
        ("stop wrong type", &chat, json!({"model": "smollm2", "messages": msg, "stop": 5})),
        ("too many stops", &chat, json!({"model": "smollm2", "messages": msg, "stop": vec!["x"; 100]})),
        ("logit_bias list", &chat, json!({"model": "smollm2", "messages": msg, "logit_bias": [1]})),
        ("logit_bias out of vocab", &chat, json!({"model": "smollm2", "messages": msg, "logit_bias": {"99999999": 1}})),
        ("stop_token_ids negative", &chat, json!({"model": "smollm2", "messages": msg, "stop_token_ids": [-1]})),
        (
            "top_logprobs too many",
            &chat,
            json!({"model": "smollm2", "messages": msg, "logprobs": true, "top_logprobs": 50}),
        ),
        ("top_logprobs without logprobs", &chat, json!({"model": "smollm2", "messages": msg, "top_logprobs": 3})),
        ("logprobs negative", &cmpl, json!({"model": "smollm2", "prompt": "a", "logprobs": -1})),
        ("prompt_logprobs too many", &cmpl, json!({"model": "smollm2", "prompt": "a", "prompt_logprobs": 21})),
        (
            "prompt_logprobs streamed chat",
            &chat,
            json!({"model": "smollm2", "messages": msg, "prompt_logprobs": 1, "stream": true}),
        ),
        (
            "min_tokens > max_tokens",
            &cmpl,
            json!({"model": "smollm2", "prompt": "a", "min_tokens": 9, "max_tokens": 2}),
        ),
        ("priority under fcfs", &cmpl, json!({"model": "smollm2", "prompt": "a", "priority": 3})),
        ("tools", &chat, json!({"model": "smollm2", "messages": msg, "tools": [{"type": "function"}]})),
        (
            "json schema",
            &chat,
            json!({"model": "smollm2", "messages": msg, "response_format": {"type": "json_schema"}}),
        ),
        ("prompt ids out of vocab", &cmpl, json!({"model": "smollm2", "prompt": [1, 2, 4000000]})),
        ("prompt ids negative", &cmpl, json!({"model": "smollm2", "prompt": [1, -2]})),
        ("batched prompts", &cmpl, json!({"model": "smollm2", "prompt": ["a", "b"]})),
        ("1 MB prompt", &cmpl, json!({"model": "smollm2", "prompt": big})),
        ("unknown model", &chat, json!({"model": "gpt-9", "messages": msg})),
        ("stream wrong type", &chat, json!({"model": "smollm2", "messages": msg, "stream": "yes"})),
    ];
    for (what, url, v) in json_cases {
        cases.push((what, url.clone(), serde_json::to_vec(&v).expect("json")));
    }
    // Seeded random mutations of a valid body: each known field gets an adversarial value.
    let fields = [
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "stop_token_ids",
        "min_tokens",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "messages",
        "model",
        "stream",
        "stream_options",
        "priority",
        "echo",
        "prompt",
        "prompt_logprobs",
    ];
    let values = [
        json!(null),
        json!(-1),
        json!(-1e300),
        json!(1e300),
        json!("x"),
        json!([]),
        json!({}),
        json!([[-7]]),
        json!({"a": [1, {"b": null}]}),
        json!(true),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("\u{0000}\u{ffff}"),
        json!([{"role": "user"}]),
        json!(3.5),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261124);
    let mut random_cases = Vec::new();
    for i in 0..150 {
        let is_chat = i % 2 == 0;
        let mut body = if is_chat {
            json!({"model": "smollm2", "messages": msg, "max_tokens": 2})
        } else {
            json!({"model": "smollm2", "prompt": "hello", "max_tokens": 2})
        };
        for _ in 0..rng.random_range(1..4) {
            let f = fields[rng.random_range(0..fields.len())];
            body[f] = values[rng.random_range(0..values.len())].clone();
        }
        let url = if is_chat { chat.clone() } else { cmpl.clone() };
        random_cases.push((url, body));
    }

    let mut refused = 0;
    for (what, url, body) in &cases {
        let r = c.post(url).header("content-type", "application/json").body(body.clone()).send().await;
        let r = r.unwrap_or_else(|e| panic!("{what}: no response ({e}) — did the server panic?"));
        let status = r.status().as_u16();
        let bytes = r.bytes().await.expect("body");
        assert!(
            (400..500).contains(&status),
            "{what}: expected a 4xx, got {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        assert_openai_error(status, &bytes, what);
        refused += 1;
    }
    let (mut ok, mut bad) = (0, 0);
    for (url, body) in &random_cases {
        let r = c.post(url).json(body).send().await.unwrap_or_else(|e| panic!("{body}: no response ({e})"));
        let status = r.status().as_u16();
        let stream = body["stream"] == json!(true);
        let bytes = r.bytes().await.expect("body");
        match status {
            200 if stream => {
                let text = String::from_utf8_lossy(&bytes);
                assert!(text.trim_end().ends_with("data: [DONE]"), "{body}: stream did not end with [DONE]: {text}");
                ok += 1;
            }
            200 => {
                let v: Value = serde_json::from_slice(&bytes).expect("200 body is JSON");
                assert!(v["choices"].as_array().is_some_and(|c| !c.is_empty()), "{body}: {v}");
                ok += 1;
            }
            400..=499 => {
                assert_openai_error(status, &bytes, &body.to_string());
                bad += 1;
            }
            _ => panic!("{body}: status {status}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    println!("fuzz: {refused} hand-written bad bodies refused; random mutations: {ok} served, {bad} refused");
    assert!(bad > 50 && ok > 0, "the mutations exercise both paths ({ok} ok, {bad} refused)");
    wait_idle(&running).await;
    let m = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), Some(0.0), "{m}");
    running.stop().await.expect("stop");
}

/// Stream a chat request in the background; resolves to (content deltas seen, finished).
fn background_stream(
    c: &reqwest::Client,
    base: &str,
    model: &str,
    max_tokens: u32,
) -> tokio::task::JoinHandle<(usize, bool)> {
    let body = json!({
        "model": model, "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let req = c.post(format!("{base}/v1/chat/completions")).json(&body);
    tokio::spawn(async move {
        let r = req.send().await.expect("stream response");
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap_or_default();
        (text.matches("\"content\"").count(), text.contains("\"finish_reason\":\"length\""))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn critical_requests_finish_while_sheddable_ones_are_shed() {
    let (running, base) = start(&[
        "--served-model-name",
        "smollm2",
        "critical-m",
        "sheddable-m",
        "--criticality",
        "critical-m=Critical",
        "--criticality",
        "sheddable-m=Sheddable",
        "--max-num-seqs",
        "2",
    ])
    .await;
    let c = client();
    let stats = running.state.engine_stats().expect("stats");
    let long: Vec<_> = (0..2).map(|_| background_stream(&c, &base, "smollm2", 400)).collect();
    let t = Instant::now();
    while stats.running.load(Ordering::Relaxed) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "the two standard streams never both ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let preempted_before = stats.preemptions.load(Ordering::Relaxed);
    let shed_body = json!({"model": "sheddable-m", "prompt": "Hello", "max_tokens": 4});
    let r = c.post(format!("{base}/v1/completions")).json(&shed_body).send().await.unwrap();
    let status = r.status().as_u16();
    assert_openai_error(status, &r.bytes().await.unwrap(), "sheddable");
    assert_eq!(status, 429, "a sheddable request is shed while saturated");
    let crit = json!({"model": "critical-m", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
    let r: Value = c.post(format!("{base}/v1/completions")).json(&crit).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["usage"]["completion_tokens"], json!(6), "critical request completed: {r}");
    assert!(stats.preemptions.load(Ordering::Relaxed) > preempted_before, "it preempted a standard stream");
    assert!(long.iter().all(|h| !h.is_finished()), "the standard streams are still going");
    // A standard request is not shed (it waits for a slot) — check it is admitted, then stop everything.
    for h in long {
        h.abort();
    }
    wait_idle(&running).await;
    let r = c.post(format!("{base}/v1/completions")).json(&shed_body).send().await.unwrap();
    assert_eq!(r.status(), 200, "not saturated any more: sheddable work runs");
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnect_cancels_the_sequence_and_frees_its_blocks() {
    let (running, base) = start(&[]).await;
    let stats = running.state.engine_stats().expect("stats");
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": true});
    for stream in [false, true] {
        let mut b = body.clone();
        b["stream"] = json!(stream);
        let aborts = stats.finished_abort.load(Ordering::Relaxed);
        let short = reqwest::Client::builder().timeout(Duration::from_millis(3000)).build().unwrap();
        let r = short.post(format!("{base}/v1/completions")).json(&b).send().await;
        if let Ok(r) = r {
            let _ = r.bytes().await; // times out midway
        }
        let t = Instant::now();
        wait_idle(&running).await;
        let gen = stats.generation_tokens.load(Ordering::Relaxed);
        assert_eq!(stats.finished_abort.load(Ordering::Relaxed), aborts + 1, "stream={stream}: counted as aborted");
        println!(
            "disconnect (stream={stream}): idle {:?} after the client gave up; {gen} tokens generated so far",
            t.elapsed()
        );
    }
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_streams_refuses_new_work_and_exits_zero() {
    let bin = env!("CARGO_BIN_EXE_tessera-worker");
    let mut w = WorkerProcess::start(bin, &smollm2_gguf(), &["--shutdown-timeout", "120"]).await;
    let c = client();
    let first_chunks = Arc::new(AtomicUsize::new(0));
    let streams: Vec<_> = (0..16)
        .map(|i| {
            let body = json!({
                "model": "smollm2", "prompt": format!("Story {i}:"), "max_tokens": 24, "ignore_eos": true,
                "stream": true, "stream_options": {"include_usage": true},
            });
            let (req, first) = (c.post(format!("{}/v1/completions", w.base)).json(&body), first_chunks.clone());
            tokio::spawn(async move {
                let r = req.send().await.expect("stream");
                assert_eq!(r.status(), 200);
                let mut s = r.bytes_stream();
                let mut text = String::new();
                while let Some(chunk) = s.next().await {
                    if text.is_empty() {
                        first.fetch_add(1, Ordering::SeqCst);
                    }
                    text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
                }
                text
            })
        })
        .collect();
    let t = Instant::now();
    while first_chunks.load(Ordering::SeqCst) < 16 {
        assert!(t.elapsed() < Duration::from_secs(120), "streams never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = c
        .post(format!("{}/v1/completions", w.base))
        .json(&json!({"model": "smollm2", "prompt": "late", "max_tokens": 2}))
        .send()
        .await
        .expect("the listener stays open while draining");
    let status = late.status().as_u16();
    assert_openai_error(status, &late.bytes().await.unwrap(), "late request");
    assert_eq!(status, 503, "a request after SIGTERM gets 503");
    let health = c.get(format!("{}/health", w.base)).send().await.expect("health");
    assert_eq!(health.status(), 503);
    for h in streams {
        let text = h.await.expect("stream task");
        assert!(text.contains("\"finish_reason\":\"length\""), "stream finished: {text}");
        assert!(text.contains("\"completion_tokens\":24"), "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
    let code = w.wait_exit(30).await;
    assert_eq!(code, Some(0), "exit code; log:\n{}", w.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_shutdown_timeout_streams_end_with_an_error_event() {
    let bin = env!("CARGO_BIN_EXE_tessera-worker");
    let mut w = WorkerProcess::start(bin, &smollm2_gguf(), &["--shutdown-timeout", "1"]).await;
    let body = json!({"model": "smollm2", "prompt": "Once", "max_tokens": 900, "ignore_eos": true, "stream": true});
    let r = client().post(format!("{}/v1/completions", w.base)).json(&body).send().await.expect("stream");
    let mut s = r.bytes_stream();
    let mut text = String::new();
    if let Some(chunk) = s.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    w.signal("TERM");
    while let Some(chunk) = s.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    assert!(text.contains("shut down before this request finished"), "error event: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(w.wait_exit(30).await, Some(0), "log:\n{}", w.log_text());
}

/// `tessera --help | head -n 1` (and `serve --help`): the binary ends quietly when its
/// reader goes away (exit 0, no panic).
#[test]
fn help_into_a_closed_pipe_ends_quietly() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker binary");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first).expect("first line");
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!first.is_empty(), "{args:?} printed a first line");
        assert!(out.status.success(), "{args:?} exits 0 after its reader went away: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
