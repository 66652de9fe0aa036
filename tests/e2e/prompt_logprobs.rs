//! Prompt log-probabilities on the real SmolLM2 worker: OpenAI's legacy `echo` + `logprobs`
//! (with `max_tokens: 0`), vLLM's `prompt_logprobs`, and their agreement with what the model
//! gives a token when it generates it, under any prefill chunking.

use serde_json::{json, Value};
use tessera_tests::{client, start_smollm2 as start};

async fn post(c: &reqwest::Client, base: &str, path: &str, body: Value) -> Value {
    let r = c.post(format!("{base}{path}")).json(&body).send().await.expect("response");
    let status = r.status();
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(status, 200, "{body} → {v}");
    v
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().expect("array").iter().map(Value::as_f64).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scores_the_prompt_like_generation_does() {
    let (running, base) = start(&[]).await;
    let c = client();
    let prompt = "The capital of France is";
    // What the model gives its greedy next token while generating.
    let gen = post(
        &c,
        &base,
        "/v1/completions",
        json!({"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 2}),
    )
    .await;
    let next = gen["choices"][0]["text"].as_str().expect("text").to_string();
    let gen_lp = gen["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().expect("logprob");

    // Score prompt + that token, generating nothing.
    let text = format!("{prompt}{next}");
    let v = post(
        &c,
        &base,
        "/v1/completions",
        json!({"model": "smollm2", "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 3}),
    )
    .await;
    let ch = &v["choices"][0];
    assert_eq!(ch["text"], json!(text), "max_tokens 0 with echo returns the prompt only");
    assert_eq!(ch["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let lp = &ch["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().expect("tokens").iter().filter_map(Value::as_str).collect();
    assert_eq!(tokens.concat(), text, "the echoed tokens spell the prompt");
    assert_eq!(tokens.len() as u64, v["usage"]["prompt_tokens"].as_u64().expect("usage"));
    let lps = floats(&lp["token_logprobs"]);
    assert_eq!(lps[0], None, "nothing predicts the first token: null");
    assert!(lp["top_logprobs"][0].is_null());
    for (i, l) in lps.iter().enumerate().skip(1) {
        let l = l.unwrap_or_else(|| panic!("token {i} has a log-probability"));
        assert!(l < 0.0 && l > -40.0, "token {i}: {l}");
        let top = lp["top_logprobs"][i].as_object().expect("alternatives");
        assert!((1..=3).contains(&top.len()), "token {i}: {top:?}");
        let best = top.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
        assert!(best >= l - 1e-6, "token {i}: the best alternative {best} is at least the token's own {l}");
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().expect("offsets").iter().filter_map(Value::as_u64).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    // The last prompt token, scored in a prefill, has the log-probability it had when sampled.
    let scored = lps[lps.len() - 1].expect("last");
    assert!((scored - gen_lp).abs() < 0.02, "prefill scores {next:?} at {scored}, generation at {gen_lp}");

    // vLLM's prompt_logprobs: the token itself (with its rank) and the top alternatives, by id.
    let v = post(
        &c,
        &base,
        "/v1/completions",
        json!({"model": "smollm2", "prompt": text, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}),
    )
    .await;
    let pl = v["choices"][0]["prompt_logprobs"].as_array().expect("prompt_logprobs").clone();
    assert_eq!(pl.len(), tokens.len());
    assert!(pl[0].is_null());
    let ids = post(&c, &base, "/tokenize", json!({"prompt": text})).await["tokens"].clone();
    for (i, entry) in pl.iter().enumerate().skip(1) {
        let m = entry.as_object().expect("map");
        let own = &m[&ids[i].to_string()];
        let rank = own["rank"].as_u64().expect("rank");
        assert!(rank >= 1);
        assert!((own["logprob"].as_f64().expect("lp") - lps[i].expect("echo lp")).abs() < 1e-4);
        assert_eq!(own["decoded_token"], json!(tokens[i]));
        // The rank-1 alternative is in the map too (it is the token itself when rank is 1).
        assert!(m.values().any(|e| e["rank"] == 1), "position {i}: {m:?}");
        assert!(m.len() <= 2);
    }
    running.stop().await.expect("stop");
}

/// Two long prompts at once share the step's token budget, so their prefills are cut into
/// different chunks than a lone run: every position's score must not depend on that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_scores_do_not_depend_on_chunking() {
    let (running, base) = start(&["--max-num-batched-tokens", "128"]).await;
    let c = client();
    let text = "Paris is the capital and largest city of France. ".repeat(30);
    let body = json!({"model": "smollm2", "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 0});
    let alone = post(&c, &base, "/v1/completions", body.clone()).await;
    let short = json!({"model": "smollm2", "prompt": "Hello there, how are", "max_tokens": 3});
    let (a, b, _) = tokio::join!(
        post(&c, &base, "/v1/completions", body.clone()),
        post(&c, &base, "/v1/completions", body.clone()),
        post(&c, &base, "/v1/completions", short),
    );
    let reference = floats(&alone["choices"][0]["logprobs"]["token_logprobs"]);
    assert!(reference.len() > 128, "the prompt spans several chunks: {}", reference.len());
    for other in [a, b] {
        let got = floats(&other["choices"][0]["logprobs"]["token_logprobs"]);
        assert_eq!(got.len(), reference.len());
        for (i, (x, y)) in got.iter().zip(&reference).enumerate() {
            match (x, y) {
                (None, None) => assert_eq!(i, 0),
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-3, "position {i}: {x} vs {y}"),
                _ => panic!("position {i}: {x:?} vs {y:?}"),
            }
        }
    }
    running.stop().await.expect("stop");
}
