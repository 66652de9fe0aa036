//! `/tokenize` and `/detokenize` on the real SmolLM2 worker: vLLM shapes, round trips, the
//! chat template, and OpenAI-shaped 4xx for bad input.

use serde_json::{json, Value};
use tessera_tests::{serve_args, smollm2_gguf};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize() {
    let running = tessera::launch(serve_args(
        &smollm2_gguf(),
        &["--served-model-name", "smollm2", "publishers/ns/models/smollm2"],
    ))
    .await
    .expect("worker starts");
    let base = format!("http://{}", running.addr);
    let c = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let req = c.post(format!("{base}{path}")).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    let text = "The quick brown fox jumps over the lazy dog.";
    let (s, t) = post("/tokenize", json!({"model": "smollm2", "prompt": text, "return_token_strs": true})).await;
    assert_eq!(s, 200, "{t}");
    let tokens = t["tokens"].as_array().unwrap().clone();
    assert_eq!(t["count"], tokens.len());
    assert_eq!(t["max_model_len"], 1024);
    assert!(tokens.len() >= 8 && tokens.len() < text.len(), "{t}");
    let strs: Vec<&str> = t["token_strs"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(strs.len(), tokens.len());
    assert!(strs.iter().any(|s| s.contains("fox")), "{strs:?}");
    let (s, d) = post("/detokenize", json!({"model": "publishers/ns/models/smollm2", "tokens": tokens})).await;
    assert_eq!((s, d["prompt"].as_str()), (200, Some(text)), "{d}");

    // Messages go through the chat template; the generation prompt is optional.
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let (_, with) = post("/tokenize", json!({"messages": msgs, "return_token_strs": true})).await;
    let (_, without) = post("/tokenize", json!({"messages": msgs, "add_generation_prompt": false})).await;
    assert!(with["count"].as_u64().unwrap() > without["count"].as_u64().unwrap(), "{with} {without}");
    let with_strs = with["token_strs"].to_string();
    assert!(with_strs.contains("<|im_start|>") && with_strs.contains("assistant"), "{with_strs}");
    let (_, plain) = post("/detokenize", json!({"tokens": with["tokens"]})).await;
    assert!(plain["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"), "{plain}");

    // Bad input: OpenAI-shaped errors naming the problem.
    for (path, body, status, param) in [
        ("/tokenize", json!({"prompt": "a", "messages": msgs}), 400, "prompt"),
        ("/tokenize", json!({}), 400, "prompt"),
        ("/tokenize", json!({"model": "nope", "prompt": "a"}), 404, "model"),
        ("/tokenize", json!({"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages"),
        ("/detokenize", json!({"tokens": [1, 999999999]}), 400, "tokens"),
    ] {
        let (s, e) = post(path, body.clone()).await;
        assert_eq!(s, status, "{path} {body}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    for body in [json!({"tokens": [-1]}), json!({"tokens": "abc"}), json!({"tokens": [1e30]})] {
        let (s, e) = post("/detokenize", body.clone()).await;
        assert_eq!(s, 400, "{body}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("invalid request body"), "{e}");
    }
    running.stop().await.unwrap();
}
