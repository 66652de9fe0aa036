//! The sampling and output options beyond temperature/top-p, and `/metrics` values that
//! match what was served, on the real SmolLM2 worker.

use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::{metric, start_smollm2 as start, wait_idle};

struct Api {
    c: reqwest::Client,
    base: String,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self.c.post(format!("{}{path}", self.base)).json(&body).send().await.expect("response");
        let status = r.status();
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(status, 200, "{body} → {v}");
        v
    }

    /// Greedy completion with `extra` fields: (text, finish reason, completion tokens).
    async fn complete(&self, prompt: &str, extra: Value) -> (String, String, u64) {
        let mut body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let v = self.post("/v1/completions", body).await;
        let c = &v["choices"][0];
        (
            c["text"].as_str().expect("text").to_string(),
            c["finish_reason"].as_str().expect("finish").to_string(),
            v["usage"]["completion_tokens"].as_u64().expect("usage"),
        )
    }

    /// How many tokens of `text` repeat an earlier one.
    async fn repeats(&self, text: &str) -> usize {
        let v = self.post("/tokenize", json!({"prompt": text, "add_special_tokens": false})).await;
        let ids: Vec<u64> = v["tokens"].as_array().expect("tokens").iter().filter_map(Value::as_u64).collect();
        let distinct: std::collections::HashSet<u64> = ids.iter().copied().collect();
        ids.len() - distinct.len()
    }

    async fn token_id(&self, text: &str) -> u32 {
        let v = self.post("/tokenize", json!({"prompt": text, "add_special_tokens": false})).await;
        let ids = v["tokens"].as_array().expect("tokens");
        assert_eq!(ids.len(), 1, "`{text}` is one token: {v}");
        ids[0].as_u64().expect("id") as u32
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_options_change_the_output_as_specified() {
    let (running, base) = start(&[]).await;
    let api = Api { c: reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap(), base };
    let prompt = "The capital of France is";
    let (plain, _, _) = api.complete(prompt, json!({})).await;
    assert!(plain.starts_with(" Paris"), "greedy baseline: {plain:?}");
    let paris = api.token_id(" Paris").await;

    // logit_bias: banning the greedy first token changes it; boosting a token forces it.
    let (banned, _, _) = api.complete(prompt, json!({"logit_bias": {paris.to_string(): -100}})).await;
    assert!(!banned.starts_with(" Paris"), "{banned:?}");
    let london = api.token_id(" London").await;
    let (forced, _, _) = api.complete(prompt, json!({"logit_bias": {london.to_string(): 100}, "max_tokens": 2})).await;
    assert_eq!(forced, " London London", "a +100 bias wins every step");

    // stop_token_ids: ends at once, without the token's text unless include_stop_str_in_output.
    let (t, f, n) = api.complete(prompt, json!({"stop_token_ids": [paris]})).await;
    assert_eq!((t.as_str(), f.as_str(), n), ("", "stop", 1));
    let (t, f, _) = api.complete(prompt, json!({"stop_token_ids": [paris], "include_stop_str_in_output": true})).await;
    assert_eq!((t.as_str(), f.as_str()), (" Paris", "stop"));
    // min_tokens: the stop token is banned until 3 tokens exist.
    let (t, _, n) = api.complete(prompt, json!({"stop_token_ids": [paris], "min_tokens": 3})).await;
    assert!(n >= 3 && !t.starts_with(" Paris"), "{t:?} ({n} tokens)");

    // Stop strings: cut before, or kept with include_stop_str_in_output.
    let word = plain.split_whitespace().nth(1).expect("a second word").to_string();
    let (t, f, _) = api.complete(prompt, json!({"stop": [word.clone()]})).await;
    assert_eq!((t.as_str(), f.as_str()), (&plain[..plain.find(&word).unwrap()], "stop"));
    let (t, _, _) = api.complete(prompt, json!({"stop": [word.clone()], "include_stop_str_in_output": true})).await;
    assert_eq!(t, plain[..plain.find(&word).unwrap() + word.len()]);

    // echo prepends the prompt.
    let (t, _, _) = api.complete(prompt, json!({"echo": true})).await;
    assert_eq!(t, format!("{prompt}{plain}"));

    // Penalties change a repetitive continuation.
    let rep = "red red red red red red";
    let (base_rep, _, _) = api.complete(rep, json!({})).await;
    for extra in
        [json!({"repetition_penalty": 1.8}), json!({"frequency_penalty": 2.0}), json!({"presence_penalty": 2.0})]
    {
        let (t, _, _) = api.complete(rep, extra.clone()).await;
        assert_ne!(t, base_rep, "{extra} had no effect");
        let (dup, base_dup) = (api.repeats(&t).await, api.repeats(&base_rep).await);
        assert!(dup < base_dup, "{extra}: {t:?} repeats {dup} tokens, {base_rep:?} {base_dup}");
    }

    // skip_special_tokens=false shows the end-of-turn marker generated past EOS.
    let chat = |skip: bool| {
        json!({
            "model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0,
            "max_tokens": 60, "ignore_eos": true, "skip_special_tokens": skip,
        })
    };
    let shown = api.post("/v1/chat/completions", chat(false)).await;
    let hidden = api.post("/v1/chat/completions", chat(true)).await;
    let shown = shown["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let hidden = hidden["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(shown.contains("<|im_end|>"), "{shown:?}");
    assert!(!hidden.contains("<|im_end|>"), "{hidden:?}");

    // min_p = 1 keeps only the most likely token: sampling at temperature 1 becomes greedy.
    let (t, _, _) = api.complete(prompt, json!({"temperature": 1.0, "min_p": 1.0, "seed": 5})).await;
    assert_eq!(t, plain);

    // n choices share the prompt: one prompt's worth of prompt tokens, n × completion tokens.
    let v = api.post("/v1/completions", json!({"model": "smollm2", "prompt": prompt, "max_tokens": 5, "n": 4, "temperature": 1.0, "seed": 3, "ignore_eos": true})).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"]["completion_tokens"], json!(20));
    let one = api.post("/tokenize", json!({"prompt": prompt})).await;
    assert_eq!(v["usage"]["prompt_tokens"], one["count"]);
    wait_idle(&running).await;
    running.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_served() {
    let (running, base) = start(&[]).await;
    let api = Api { c: reqwest::Client::new(), base: base.clone() };
    let scrape = || async { api.c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap() };
    let m = scrape().await;
    for (name, labels) in [
        ("vllm:cache_config_info", "block_size=\"16\""),
        ("vllm:lora_requests_info", "max_lora=\"0\""),
        ("vllm:num_requests_running", "model_name=\"smollm2\""),
        ("vllm:gpu_cache_usage_perc", "model_name"),
    ] {
        let line = m.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing:\n{m}"));
        assert!(line.contains(labels), "{line}");
    }
    // The CPU's fused kernels passed their start-up check against the references.
    for kernel in ["add_rms_norm", "silu_mul", "cache_write", "paged_attention"] {
        let want = format!("tessera:kernel_path{{kernel=\"{kernel}\",path=\"fused\",reason=\"passed\"");
        assert!(m.lines().any(|l| l.starts_with(&want)), "{want} missing:\n{m}");
    }
    // The CPU has no fused rotary: the reference runs, and the metric says why.
    let want = "tessera:kernel_path{kernel=\"rotary\",path=\"reference\",reason=\"no\"";
    assert!(m.lines().any(|l| l.starts_with(want)), "{want} missing:\n{m}");
    // 3 requests of known sizes: 2 stopped by length, 1 by a stop token (the greedy first token).
    let prompt = "Geography quiz. Answer briefly and precisely, with one word per answer and no explanations \
                  at all. Question one: the capital of France is";
    let mut prompt_tokens = 0;
    let mut gen = 0;
    let mut first_token = None;
    for i in 0..3 {
        let mut body = json!({"model": "smollm2", "prompt": prompt, "temperature": 0, "max_tokens": 5 + 2 * i});
        if i < 2 {
            body["ignore_eos"] = json!(true);
        } else {
            body["stop_token_ids"] = json!([first_token.expect("first token")]);
        }
        let v = api.post("/v1/completions", body).await;
        if i == 0 {
            let text = v["choices"][0]["text"].as_str().unwrap();
            let ids = api.post("/tokenize", json!({"prompt": text, "add_special_tokens": false})).await;
            first_token = ids["tokens"][0].as_u64();
        }
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
        gen += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(gen, 13);
    let m = scrape().await;
    let get = |name: &str| metric(&m, name).unwrap_or_else(|| panic!("{name} missing:\n{m}"));
    assert_eq!(get("vllm:prompt_tokens_total"), prompt_tokens as f64);
    assert_eq!(get("vllm:generation_tokens_total"), gen as f64);
    for h in ["vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]
    {
        assert_eq!(get(&format!("{h}_count")), 3.0, "{h}");
        assert!(get(&format!("{h}_sum")) > 0.0, "{h}");
    }
    // One gap between consecutive tokens of the same request: (5-1)+(7-1)+(1-1).
    assert_eq!(get("vllm:inter_token_latency_seconds_count"), 10.0);
    let success = |reason: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("vllm:request_success_total") && l.contains(&format!("finished_reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(success("length"), Some(2.0));
    assert_eq!(success("stop"), Some(1.0));
    // The same prompt three times: the 2nd and 3rd found its full blocks in the prefix cache.
    assert_eq!(get("vllm:prefix_cache_queries_total"), prompt_tokens as f64);
    let cached = (prompt_tokens / 3 - 1) / 16 * 16;
    assert!(cached >= 16, "the prompt spans a full block ({} tokens)", prompt_tokens / 3);
    assert_eq!(get("vllm:prefix_cache_hits_total"), 2.0 * cached as f64);
    // The bucket lines are cumulative and end at +Inf = count.
    let inf = m
        .lines()
        .find(|l| l.starts_with("vllm:e2e_request_latency_seconds_bucket") && l.contains("le=\"+Inf\""))
        .expect("+Inf bucket");
    assert!(inf.ends_with(" 3"), "{inf}");
    running.stop().await.expect("stop");
}
