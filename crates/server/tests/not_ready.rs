//! Before a model is attached the server answers, but says it is not ready.

use serde_json::Value;
use tessera_server::{app, AppState, ModelInfo};

#[tokio::test]
async fn loading_server_is_503_with_openai_errors() {
    let state = AppState::new(ModelInfo::new(vec!["m".into()], "/mnt/models".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app(state)).await });
    let c = reqwest::Client::new();
    let base = format!("http://{addr}");
    assert_eq!(c.get(format!("{base}/health")).send().await.unwrap().status(), 503);
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 503);
    assert!(v["error"]["message"].as_str().unwrap().contains("loading"));
    // The model list is known before loading; unknown paths are OpenAI-shaped 404s.
    let models: Value = c.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "m");
    let r = c.get(format!("{base}/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], 404);
}
