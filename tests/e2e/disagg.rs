//! Prefill/decode roles as KServe's presets and llm-d's routing sidecar use them: workers
//! started with `--kv-transfer-config` (both spellings, both connector names) serve, and the
//! two legs the sidecar sends give the monolithic answer. The first leg is a one-token,
//! non-streamed prefill with `kv_transfer_params.do_remote_decode`. The second is the original
//! request with the prefill's `kv_transfer_params` (absent until blocks move between workers,
//! so null). The prefill leg answers exactly one token whatever other limit the body carries.
//! Block transfer itself is not built yet; when it is, these legs must also skip the decode
//! side's prefill.

use serde_json::{json, Value};
use tessera_tests::{client, start_smollm2 as start};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_shaped_legs_answer_like_a_monolithic_worker() {
    let producer = r#"{"kv_connector":"TesseraConnector","kv_role":"kv_producer","kv_port":0}"#;
    let consumer = r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_port":0}"#;
    let (prefill, p) = start(&["--kv-transfer-config", producer]).await;
    let (decode, d) = start(&["--kv_transfer_config", consumer]).await;
    let (mono, m) = start(&[]).await;
    let c = client();
    let prompts = ["The capital of France is", "Water boils at", "List three colours:"];
    for (i, prompt) in prompts.iter().enumerate() {
        for (path, chat) in [("/v1/completions", false), ("/v1/chat/completions", true)] {
            let stream = i % 2 == 1;
            let mut original = json!({"model": "smollm2", "max_tokens": 12, "temperature": 0, "stream": stream});
            if chat {
                original["messages"] = json!([{"role": "user", "content": prompt}]);
            } else {
                original["prompt"] = json!(prompt);
            }
            let want = text_of(post(&c, format!("{m}{path}"), &original).await, chat, stream).await;

            let first: Value =
                post(&c, format!("{p}{path}"), &prefill_leg(&original)).await.json().await.expect("JSON");
            assert_eq!(first["choices"][0]["finish_reason"], "length", "{first}");
            assert_eq!(first["usage"]["completion_tokens"], 1, "{first}");
            let mut second = original.clone();
            second["kv_transfer_params"] = first.get("kv_transfer_params").cloned().unwrap_or(Value::Null);
            let got = text_of(post(&c, format!("{d}{path}"), &second).await, chat, stream).await;
            assert!(!want.is_empty());
            assert_eq!(got, want, "{path} stream={stream}: {prompt}");
        }
    }
    // The older sidecar sets only `max_tokens: 1` on chat: a leftover `max_completion_tokens`
    // must not make the prefill worker generate more than the one token.
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Count to ten."}],
                      "max_completion_tokens": 40, "temperature": 0});
    let first: Value =
        post(&c, format!("{p}/v1/chat/completions"), &prefill_leg(&chat)).await.json().await.expect("JSON");
    assert_eq!(first["usage"]["completion_tokens"], 1, "{first}");
    // Both flags at once is a client error naming the field.
    let mut bad = chat.clone();
    bad["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": true});
    let r = c.post(format!("{d}/v1/chat/completions")).json(&bad).send().await.expect("response");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap_or_default().contains("kv_transfer_params"));
    for w in [prefill, decode, mono] {
        w.stop().await.expect("stop");
    }
}
