//! Load on loopback: 240 requests from 64 concurrent clients mixing streaming, whole,
//! disconnect-midway and over-queue-limit requests against the SmolLM2 worker. Its own test
//! binary so that no other test competes for the 2 cores while it runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tessera_tests::{assert_openai_error, client, metric, peak_rss_kib, start_smollm2 as start, wait_idle};

#[derive(Debug, Default)]
struct Tally {
    complete: AtomicUsize,
    rejected_429: AtomicUsize,
    disconnected: AtomicUsize,
}

/// One load-test request; panics on anything that is neither complete and well-formed, nor a
/// clear 429, nor our own disconnect.
async fn one_request(c: &reqwest::Client, base: &str, i: usize, tally: &Tally) {
    let mode = i % 5; // 0,1 streaming; 2,3 whole; 4 disconnect midway
    let stream = mode <= 1 || mode == 4;
    let max_tokens = if mode == 4 { 200 } else { 8 };
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": format!("Tell me fact number {i} about the sea.")}],
        "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "ignore_eos": true,
        "stream": stream, "stream_options": {"include_usage": true},
    });
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.expect("response");
    let status = r.status().as_u16();
    if status == 429 {
        assert_openai_error(429, &r.bytes().await.expect("body"), "429");
        tally.rejected_429.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await; // what a client does: back off
        return;
    }
    assert_eq!(status, 200, "request {i}");
    if mode == 4 {
        let mut s = r.bytes_stream();
        let mut seen = 0;
        while let Some(chunk) = s.next().await {
            seen += chunk.expect("chunk").len();
            if seen > 300 {
                break; // hang up midway
            }
        }
        tally.disconnected.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if stream {
        let text = r.text().await.expect("stream");
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "request {i}: {text}");
        let mut finish = None;
        let mut usage = Value::Null;
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).expect("chunk JSON");
            assert!(v.get("error").is_none(), "request {i}: error event {v}");
            if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
        assert_eq!(finish.as_deref(), Some("length"), "request {i}");
        assert_eq!(usage["completion_tokens"], json!(8), "request {i}: {usage}");
    } else {
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(v["choices"][0]["finish_reason"], json!("length"), "request {i}: {v}");
        assert_eq!(v["usage"]["completion_tokens"], json!(8), "request {i}: {v}");
        assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    }
    tally.complete.fetch_add(1, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_mix_of_streams_disconnects_and_overload_loses_nothing() {
    let (running, base) = start(&["--max-num-seqs", "16", "--max-queued-requests", "40"]).await;
    let rss_before = peak_rss_kib().expect("the peak RSS (VmHWM in /proc/self/status) is readable");
    let c = client();
    let (next, tally) = (Arc::new(AtomicUsize::new(0)), Arc::new(Tally::default()));
    const TOTAL: usize = 240;
    let t0 = Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (c, base, next, tally) = (c.clone(), base.clone(), next.clone(), tally.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        return;
                    }
                    one_request(&c, &base, i, &tally).await;
                }
            })
        })
        .collect();
    for h in clients {
        h.await.expect("client task");
    }
    let (done, shed, gone) = (
        tally.complete.load(Ordering::Relaxed),
        tally.rejected_429.load(Ordering::Relaxed),
        tally.disconnected.load(Ordering::Relaxed),
    );
    wait_idle(&running).await;
    let rss_peak = peak_rss_kib().expect("the peak RSS (VmHWM in /proc/self/status) is readable");
    let m = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    println!(
        "load: {TOTAL} requests from 64 clients in {:.1}s: {done} complete, {shed} got 429, {gone} disconnected; \
         peak RSS {} MiB (before load {} MiB); ttft count {:?}",
        t0.elapsed().as_secs_f64(),
        rss_peak / 1024,
        rss_before / 1024,
        metric(&m, "vllm:time_to_first_token_seconds_count")
    );
    assert_eq!(done + shed + gone, TOTAL, "every request is accounted for");
    assert!(shed > 0, "the queue limit was reached");
    assert!(done >= 20 && gone >= 5, "the mix ran ({done} complete, {gone} disconnected)");
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), Some(0.0));
    // The process holds the model (~0.5 GiB as f32) and a 256 MiB cache: growth stays small.
    assert!(rss_peak < rss_before + 1024 * 1024, "RSS grew from {rss_before} KiB to {rss_peak} KiB");
    running.stop().await.expect("stop");
}
