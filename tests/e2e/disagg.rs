//! Prefill/decode disaggregation as KServe's presets and llm-d's routing sidecar drive it:
//! workers started with `--kv-transfer-config` (both spellings, both connector names), the
//! two legs the sidecar sends (a one-token, non-streamed prefill with
//! `kv_transfer_params.do_remote_decode`, then the original request with the prefill's
//! `kv_transfer_params`), the KV blocks pulled between them, and the faults: a used token,
//! pins nobody pulls, a prefill worker that is gone.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tessera_tests::{client, metric, start_smollm2 as start, WorkerProcess};

async fn post(c: &reqwest::Client, url: String, body: &Value) -> reqwest::Response {
    let r = c.post(url).json(body).send().await.expect("response");
    assert_eq!(r.status(), 200, "{body}");
    r
}

/// The text of a completion or chat answer, streamed (SSE) or not.
async fn text_of(r: reqwest::Response, chat: bool, stream: bool) -> String {
    let field = |c: &Value| {
        let v = if chat { &c[if stream { "delta" } else { "message" }]["content"] } else { &c["text"] };
        v.as_str().unwrap_or_default().to_string()
    };
    let body = r.text().await.expect("body");
    if !stream {
        let v: Value = serde_json::from_str(&body).expect("JSON");
        return field(&v["choices"][0]);
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("event"))
        .filter_map(|v| v["choices"].get(0).map(field))
        .collect()
}

/// The prefill leg, shaped as llm-d's sidecar shapes it.
fn prefill_leg(original: &Value) -> Value {
    let mut leg = original.clone();
    let o = leg.as_object_mut().expect("object");
    o.remove("stream_options");
    o.insert("stream".into(), json!(false));
    o.insert("max_tokens".into(), json!(1));
    o.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    leg
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text")
}

async fn counter(c: &reqwest::Client, base: &str, name: &str) -> f64 {
    metric(&metrics(c, base).await, name).unwrap_or_else(|| panic!("{name} missing"))
}

/// The `reason` sample of the fallback counter.
async fn fallbacks(c: &reqwest::Client, base: &str, reason: &str) -> f64 {
    let text = metrics(c, base).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("tessera:kv_transfer_fallbacks_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .unwrap_or_else(|| panic!("no fallback sample for {reason}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value")
}

/// The prefill worker's answer (at `url`) to the prefill leg of `original`.
async fn prefill_answer(c: &reqwest::Client, url: String, original: &Value) -> Value {
    post(c, url, &prefill_leg(original)).await.json().await.expect("JSON")
}

/// The decode leg: the original request with the prefill answer's `kv_transfer_params`.
fn decode_leg(original: &Value, first: &Value) -> Value {
    let mut second = original.clone();
    second["kv_transfer_params"] = first["kv_transfer_params"].clone();
    second
}

fn original(prompt: &str, chat: bool, stream: bool) -> Value {
    let mut o = json!({"model": "smollm2", "max_tokens": 12, "temperature": 0, "stream": stream});
    if chat {
        o["messages"] = json!([{"role": "user", "content": prompt}]);
    } else {
        o["prompt"] = json!(prompt);
    }
    o
}

fn kv_config(role: &str, extra: &str) -> String {
    format!(
        r#"{{"kv_connector":"TesseraConnector","kv_role":"{role}","kv_ip":"127.0.0.1","kv_port":0,
            "kv_connector_extra_config":{{{extra}}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_shaped_legs_move_the_prompts_kv_and_answer_like_a_monolithic_worker() {
    let producer = kv_config("kv_producer", r#""pin_timeout": 3"#);
    let consumer = r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_port":0}"#;
    let (prefill, p) = start(&["--kv-transfer-config", &producer]).await;
    let (decode, d) = start(&["--kv_transfer_config", consumer]).await;
    let (mono, m) = start(&[]).await;
    let c = client();
    let prompts = ["The capital of France is", "Water boils at", "List three colours:"];
    let mut replay = None;
    for (i, prompt) in prompts.iter().enumerate() {
        for (path, chat) in [("/v1/completions", false), ("/v1/chat/completions", true)] {
            let stream = i % 2 == 1;
            let original = original(prompt, chat, stream);
            let want = text_of(post(&c, format!("{m}{path}"), &original).await, chat, stream).await;

            // llm-d's sidecar clones the request, so both legs still carry its routing header;
            // neither worker may act on it (the prefill worker does not decode; the decode leg
            // already has its params).
            let routed = |url: String, body: &Value| {
                c.post(url).header("x-prefiller-host-port", "10.9.9.9:8000").json(body).send()
            };
            let r = routed(format!("{p}{path}"), &prefill_leg(&original)).await.expect("response");
            assert_eq!(r.status(), 200);
            let first: Value = r.json().await.expect("JSON");
            assert_eq!(first["choices"][0]["finish_reason"], "length", "{first}");
            assert_eq!(first["usage"]["completion_tokens"], 1, "{first}");
            let kv = &first["kv_transfer_params"];
            assert_eq!(kv["do_remote_prefill"], true, "{first}");
            assert_eq!(kv["remote_host"], "127.0.0.1", "{first}");
            assert!(kv["remote_port"].as_u64().is_some_and(|p| p > 0), "{first}");
            assert!(kv["remote_block_ids"].as_array().is_some_and(|b| !b.is_empty()), "{first}");
            assert_eq!(kv["transfer_token"].as_str().map(str::len), Some(32), "{first}");
            assert_eq!(kv["tp_size"], 1, "{first}");
            assert!(counter(&c, &p, "tessera:kv_pinned_blocks").await > 0.0, "blocks are pinned until pulled");

            let computed = counter(&c, &d, "tessera:prompt_tokens_computed_total").await;
            let mut second = original.clone();
            second["kv_transfer_params"] = kv.clone();
            let r = routed(format!("{d}{path}"), &second).await.expect("response");
            assert_eq!(r.status(), 200);
            let got = text_of(r, chat, stream).await;
            assert!(!want.is_empty());
            assert_eq!(got, want, "{path} stream={stream}: {prompt}");
            let now = counter(&c, &d, "tessera:prompt_tokens_computed_total").await;
            assert_eq!(now - computed, 1.0, "only the last prompt token is computed on the decode side");
            replay = Some((path, chat, second, want));
        }
    }
    // Sampling with a seed draws the same tokens split or not (the decode side samples the
    // first token itself, as choice 0 of the request).
    let mut seeded = original("Once upon a time", false, false);
    seeded["temperature"] = json!(1.0);
    seeded["seed"] = json!(7);
    seeded["max_tokens"] = json!(24);
    let want = text_of(post(&c, format!("{m}/v1/completions"), &seeded).await, false, false).await;
    let first = prefill_answer(&c, format!("{p}/v1/completions"), &seeded).await;
    let second = decode_leg(&seeded, &first);
    assert_eq!(text_of(post(&c, format!("{d}/v1/completions"), &second).await, false, false).await, want);
    assert_eq!(fallbacks(&c, &d, "pull_failed").await, 0.0);
    assert!(counter(&c, &d, "tessera:kv_transfer_blocks_received_total").await > 0.0);
    let sent = counter(&c, &p, "tessera:kv_transfer_bytes_sent_total").await;
    assert_eq!(sent, counter(&c, &d, "tessera:kv_transfer_bytes_received_total").await);
    assert_eq!(counter(&c, &p, "tessera:kv_pinned_blocks").await, 0.0, "every pin was pulled and freed");

    // A token works once: replaying a decode leg cannot read the prompt's KV again; the decode
    // worker computes the prompt itself and still answers the same.
    let (path, chat, second, want) = replay.expect("a leg ran");
    let computed = counter(&c, &d, "tessera:prompt_tokens_computed_total").await;
    let got = text_of(post(&c, format!("{d}{path}"), &second).await, chat, false).await;
    assert_eq!(got, want);
    assert_eq!(fallbacks(&c, &d, "pull_failed").await, 1.0);
    assert!(counter(&c, &d, "tessera:prompt_tokens_computed_total").await - computed > 1.0);

    // Pins nobody pulls expire: the blocks come back and the expiry is counted.
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Count to ten."}],
                      "max_completion_tokens": 40, "temperature": 0});
    let first = prefill_answer(&c, format!("{p}/v1/chat/completions"), &chat).await;
    // The older sidecar sets only `max_tokens: 1` on chat: a leftover `max_completion_tokens`
    // must not make the prefill worker generate more than the one token.
    assert_eq!(first["usage"]["completion_tokens"], 1, "{first}");
    let pinned = counter(&c, &p, "tessera:kv_pinned_blocks").await;
    assert!(pinned > 0.0);
    let stats = prefill.state.engine_stats().expect("stats");
    let free = stats.free_blocks.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(free + pinned as usize, stats.num_blocks, "pinned blocks are not free");
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert_eq!(counter(&c, &p, "tessera:kv_pins_expired_total").await, 1.0);
    assert_eq!(counter(&c, &p, "tessera:kv_pinned_blocks").await, 0.0);
    tessera_tests::wait_idle(&prefill).await;
    // Its decode leg finds the token expired and recomputes.
    let second = decode_leg(&chat, &first);
    let want = text_of(post(&c, format!("{m}/v1/chat/completions"), &chat).await, true, false).await;
    let got = text_of(post(&c, format!("{d}/v1/chat/completions"), &second).await, true, false).await;
    assert_eq!(got, want);
    assert_eq!(fallbacks(&c, &d, "pull_failed").await, 2.0);

    // Both flags at once is a client error naming the field; so is a leg this worker's role
    // does not serve.
    let mut bad = chat.clone();
    bad["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": true});
    let r = c.post(format!("{d}/v1/chat/completions")).json(&bad).send().await.expect("response");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap_or_default().contains("kv_transfer_params"));
    for (base, leg) in [(&d, prefill_leg(&chat)), (&m, prefill_leg(&chat)), (&p, second.clone())] {
        let r = c.post(format!("{base}/v1/chat/completions")).json(&leg).send().await.expect("response");
        assert_eq!(r.status(), 400, "{base}");
        assert!(r.text().await.unwrap_or_default().contains("--kv-transfer-config"));
    }
    for w in [prefill, decode, mono] {
        w.stop().await.expect("stop");
    }
}

/// The `host:port` of a base URL.
fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// A stand-in prefill endpoint that answers 503 `fail` times, then forwards to `target`;
/// what it received (x-request-id, body) is recorded.
async fn flaky_prefiller(target: String, fail: usize) -> (String, Arc<Mutex<Vec<(String, Value)>>>) {
    use axum::http::{HeaderMap, StatusCode};
    let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let log = seen.clone();
    let handler = move |headers: HeaderMap, axum::Json(body): axum::Json<Value>| {
        let (log, target) = (log.clone(), target.clone());
        async move {
            let rid = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let n = {
                let mut l = log.lock().expect("lock");
                l.push((rid, body.clone()));
                l.len()
            };
            if n <= fail {
                return (StatusCode::SERVICE_UNAVAILABLE, "busy".to_string());
            }
            let r = client().post(format!("{target}/v1/chat/completions")).json(&body).send().await.expect("forward");
            (StatusCode::from_u16(r.status().as_u16()).expect("status"), r.text().await.expect("body"))
        }
    };
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_splits_requests_itself_across_processes() {
    let bin = env!("CARGO_BIN_EXE_tessera-worker");
    let gguf = tessera_tests::smollm2_gguf();
    let producer = kv_config("kv_producer", "");
    let consumer = kv_config("kv_consumer", "");
    let mut prefill = WorkerProcess::start(bin, &gguf, &["--kv-transfer-config", &producer]).await;
    let decode =
        WorkerProcess::start(bin, &gguf, &["--kv-transfer-config", &consumer, "--trusted-prefillers", "127.0.0.1"])
            .await;
    let (mono, m) = start(&[]).await;
    let (c, d) = (client(), decode.base.clone());
    let header = ("x-prefiller-host-port", host_port(&prefill.base));
    let prompts = [
        "The capital of France is",
        "Water boils at",
        "List three colours:",
        "Write a haiku about the sea.",
        "What is 12 times 7?",
        "Name a planet with rings.",
        "Translate 'good morning' into French.",
        "Why is the sky blue?",
        "Give me a word that rhymes with cat.",
        "Describe a cat in one sentence.",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        let (chat, stream) = (i % 2 == 1, i % 4 >= 2);
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let body = original(prompt, chat, stream);
        let want = text_of(post(&c, format!("{m}{path}"), &body).await, chat, stream).await;
        let computed = counter(&c, &d, "tessera:prompt_tokens_computed_total").await;
        let r = c.post(format!("{d}{path}")).header(header.0, &header.1).json(&body).send().await.expect("send");
        assert_eq!(r.status(), 200);
        let got = text_of(r, chat, stream).await;
        assert_eq!(got, want, "{path} stream={stream}: {prompt}");
        let now = counter(&c, &d, "tessera:prompt_tokens_computed_total").await;
        assert_eq!(now - computed, 1.0, "{prompt}: the decode worker computed only the last prompt token");
    }
    for reason in ["pull_failed", "prefill_leg", "unsupported"] {
        assert_eq!(fallbacks(&c, &d, reason).await, 0.0, "{reason}");
    }
    assert!(counter(&c, &d, "tessera:kv_transfer_latency_seconds_count").await >= 10.0);

    // A prefill worker not in --trusted-prefillers is never contacted: 403, OpenAI-shaped.
    let body = original("Hello", true, false);
    for untrusted in ["127.0.0.2:9", "localhost:9", "http://10.1.2.3:8000"] {
        let r = c.post(format!("{d}/v1/chat/completions")).header(header.0, untrusted).json(&body).send().await;
        let r = r.expect("send");
        let status = r.status().as_u16();
        tessera_tests::assert_openai_error(status, &r.bytes().await.expect("body"), untrusted);
        assert_eq!(status, 403, "{untrusted}");
    }

    // A prefill leg answered 503 is retried, with the same request id and the sidecar's shape.
    let (flaky, seen) = flaky_prefiller(prefill.base.clone(), 2).await;
    let want = text_of(post(&c, format!("{m}/v1/chat/completions"), &body).await, true, false).await;
    let r = c
        .post(format!("{d}/v1/chat/completions"))
        .header(header.0, host_port(&flaky))
        .header("x-request-id", "req-42")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(text_of(r, true, false).await, want);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 3, "two 503s, then the leg that worked");
    for (rid, leg) in &seen {
        assert_eq!(rid, "req-42");
        assert_eq!((leg["stream"].clone(), leg["max_tokens"].clone()), (json!(false), json!(1)), "{leg}");
        assert_eq!(leg["kv_transfer_params"]["do_remote_decode"], true, "{leg}");
    }
    assert_eq!(fallbacks(&c, &d, "pull_failed").await, 0.0);

    // The prefill worker dies between the legs: the decode leg recomputes and still answers.
    let first = prefill_answer(&c, format!("{}/v1/chat/completions", prefill.base), &body).await;
    prefill.signal("KILL");
    prefill.wait_exit(30).await;
    let second = decode_leg(&body, &first);
    assert_eq!(text_of(post(&c, format!("{d}/v1/chat/completions"), &second).await, true, false).await, want);
    assert_eq!(fallbacks(&c, &d, "pull_failed").await, 1.0);
    // And through the proxy: the prefill leg cannot be sent, so the prompt is computed here.
    let r = c.post(format!("{d}/v1/chat/completions")).header(header.0, &header.1).json(&body).send().await;
    assert_eq!(text_of(r.expect("send"), true, false).await, want);
    assert_eq!(fallbacks(&c, &d, "prefill_leg").await, 1.0);
    mono.stop().await.expect("stop");
}

/// A tiny random llama that carries SmolLM2's tokenizer, so it serves HTTP.
fn tiny_servable(name: &str) -> std::path::PathBuf {
    use tessera_tests::tiny::{tiny_weights, write_hf, TinyShape};
    let s = TinyShape { vocab: 49152, ..TinyShape::default() };
    let dir = std::env::temp_dir().join(format!("tessera-pd-{}-{name}", std::process::id()));
    write_hf(&dir, s, &tiny_weights(s), 1);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tessera_tests::smollm2_hf().join(f), dir.join(f)).expect("tokenizer files");
    }
    dir
}

/// An in-process worker on a tiny model with a small cache, and its base URL.
async fn launch_tiny(dir: std::path::PathBuf, extra: Vec<String>) -> (tessera::Running, String) {
    let mut args: Vec<&str> = vec!["--max-model-len", "256", "--kv-cache-memory", "16MiB"];
    args.extend(extra.iter().map(String::as_str));
    let running = tessera::launch(tessera_tests::serve_args(&dir, &args)).await.expect("worker starts");
    let base = format!("http://{}", running.addr);
    (running, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_workers_move_kv_rank_by_rank_and_refuse_another_layout() {
    let dir = tiny_servable("tp");
    let launch = |extra: Vec<String>| launch_tiny(dir.clone(), extra);
    let tp2 = |role: Option<&str>| {
        let mut v = vec!["--tensor-parallel-size".to_string(), "2".into()];
        if let Some(role) = role {
            v.extend(["--kv-transfer-config".into(), kv_config(role, "")]);
        }
        v
    };
    let (mono, m) = launch(tp2(None)).await;
    let (prefill, p) = launch(tp2(Some("kv_producer"))).await;
    let (decode, d) = launch(tp2(Some("kv_consumer"))).await;
    let (single, s) = launch(vec!["--kv-transfer-config".into(), kv_config("kv_consumer", "")]).await;
    let c = client();
    for prompt in ["one two three four five six seven eight nine ten", "Hello there", "a b c d e f g h i j k l m n o p"]
    {
        let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 8, "ignore_eos": true, "temperature": 0});
        let want = text_of(post(&c, format!("{m}/v1/completions"), &body).await, false, false).await;
        let first = prefill_answer(&c, format!("{p}/v1/completions"), &body).await;
        assert_eq!(first["kv_transfer_params"]["tp_size"], 2, "{first}");
        let second = decode_leg(&body, &first);
        let computed = counter(&c, &d, "tessera:prompt_tokens_computed_total").await;
        let got = text_of(post(&c, format!("{d}/v1/completions"), &second).await, false, false).await;
        assert_eq!(got, want, "{prompt}");
        assert_eq!(counter(&c, &d, "tessera:prompt_tokens_computed_total").await - computed, 1.0, "{prompt}");
    }
    assert_eq!(fallbacks(&c, &d, "pull_failed").await, 0.0);
    // A one-rank decode worker cannot take two ranks' KV: refused, named, and computed locally.
    let body =
        json!({"model": "smollm2", "prompt": "Hello there", "max_tokens": 8, "ignore_eos": true, "temperature": 0});
    let want = text_of(post(&c, format!("{s}/v1/completions"), &body).await, false, false).await;
    let first = prefill_answer(&c, format!("{p}/v1/completions"), &body).await;
    let second = decode_leg(&body, &first);
    assert_eq!(text_of(post(&c, format!("{s}/v1/completions"), &second).await, false, false).await, want);
    assert_eq!(fallbacks(&c, &s, "pull_failed").await, 1.0);
    for w in [mono, prefill, decode, single] {
        w.stop().await.expect("stop");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_replicas_each_serve_and_pull_their_own_kv() {
    let dir = tiny_servable("dp");
    let launch = |extra: Vec<String>| launch_tiny(dir.clone(), extra);
    let dp2 = |role: &str| {
        vec!["--data-parallel-size".into(), "2".into(), "--kv-transfer-config".into(), kv_config(role, "")]
    };
    let (mono, m) = launch(vec![]).await;
    let (prefill, p) = launch(dp2("kv_producer")).await;
    let (decode, d) = launch(dp2("kv_consumer")).await;
    let c = client();
    let prompts = ["one two three four five six seven eight", "Hello there", "a b c d e f g h i j k", "red green blue"];
    let bodies: Vec<Value> = prompts
        .iter()
        .map(|p| json!({"model": "smollm2", "prompt": p, "max_tokens": 8, "ignore_eos": true, "temperature": 0}))
        .collect();
    // Concurrent prefill legs spread over both replicas; each answers with its own engine.
    let firsts: Vec<Value> = futures::future::join_all(bodies.iter().map(|b| {
        let (c, url, leg) = (c.clone(), format!("{p}/v1/completions"), prefill_leg(b));
        async move { c.post(url).json(&leg).send().await.expect("send").json::<Value>().await.expect("JSON") }
    }))
    .await;
    let engines: std::collections::HashSet<String> = firsts
        .iter()
        .map(|f| f["kv_transfer_params"]["remote_engine_id"].as_str().expect("engine id").to_string())
        .collect();
    assert_eq!(engines.len(), 2, "both replicas prefilled: {engines:?}");
    for (body, first) in bodies.iter().zip(&firsts) {
        let want = text_of(post(&c, format!("{m}/v1/completions"), body).await, false, false).await;
        let second = decode_leg(body, first);
        let got = text_of(post(&c, format!("{d}/v1/completions"), &second).await, false, false).await;
        assert_eq!(got, want);
    }
    // Summed over the replicas (samples carry an `engine` label).
    let text = metrics(&c, &d).await;
    let sum = |name: &str, only: &str| -> f64 {
        (text.lines())
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(only))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(sum("tessera:kv_transfer_fallbacks_total", "pull_failed"), 0.0, "no pull failed");
    let computed = sum("tessera:prompt_tokens_computed_total", "");
    assert_eq!(computed, prompts.len() as f64, "one prompt token computed per decode leg, over both replicas");
    for w in [mono, prefill, decode] {
        w.stop().await.expect("stop");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
