//! all-MiniLM-L6-v2 through the shared layers equals an independent reference: a numpy
//! forward pass written in `tests/python/minilm_reference.py` over the same safetensors,
//! tokenised by Hugging Face's `tokenizers` package (PyPI, `scripts/reference-venv.sh`). 20
//! sentences, one at a time and as one padded batch: cosine ≥ 0.9999 and the same token ids.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use candle_core::{DType, Device};
use serde_json::{json, Value};
use tessera_tests::{client, minilm, serve_args, start_smollm2};

const SENTENCES: [&str; 20] = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Paris is the capital of France.",
    "Quantum computers use qubits instead of bits.",
    "I love eating fresh strawberries in the summer.",
    "The stock market fell sharply on Monday.",
    "She reads a book every night before sleeping.",
    "Rust guarantees memory safety without a garbage collector.",
    "The weather today is cloudy with a chance of rain.",
    "Dogs are loyal companions.",
    "Photosynthesis converts light into chemical energy.",
    "He missed the train by two minutes.",
    "The recipe calls for two cups of flour and one egg.",
    "Mount Everest is the highest mountain above sea level.",
    "Children were playing football in the park after school, laughing loudly.",
    "Encryption protects data in transit and at rest.",
    "Hi!",
    "What time does the museum open on Sundays?",
    "The orchestra performed Beethoven's Ninth Symphony to a standing ovation.",
    "Électricité et café: un matin à Montréal.",
];

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The numpy reference of `SENTENCES`: (token ids, embedding) each.
fn reference(dir: &Path) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = Command::new(root.join("scripts/reference-venv.sh")).output().expect("run scripts/reference-venv.sh");
    assert!(venv.status.success(), "reference-venv.sh failed:\n{}", String::from_utf8_lossy(&venv.stderr));
    let python = String::from_utf8_lossy(&venv.stdout).lines().last().expect("python").trim().to_string();
    let mut child = Command::new(python)
        .arg(root.join("tests/python/minilm_reference.py"))
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference");
    child.stdin.take().unwrap().write_all(serde_json::to_string(&SENTENCES).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().expect("the reference");
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

#[test]
fn minilm_embeddings_equal_an_independent_numpy_reference() {
    let dir = minilm();
    let reference = reference(&dir);
    let enc = tessera_loader::open_encoder(&dir, DType::F32, &Device::Cpu).expect("open the encoder");
    assert_eq!((enc.pooling, enc.normalize, enc.max_tokens), (tessera_models::Pooling::Mean, true, 256));
    let ids: Vec<Vec<u32>> =
        SENTENCES.iter().map(|s| enc.tokenizer.encode(*s, true).expect("encode").get_ids().to_vec()).collect();
    let batched = enc.model.embed(&ids, enc.pooling, enc.normalize).expect("batch");
    let mut worst = 1f64;
    for (i, r) in reference.iter().enumerate() {
        let want_ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
        assert_eq!(ids[i], want_ids, "token ids of {:?}", SENTENCES[i]);
        let want: Vec<f64> = serde_json::from_value(r["embedding"].clone()).unwrap();
        let single = enc.model.embed(&ids[i..=i], enc.pooling, enc.normalize).expect("single");
        for (what, got) in [("alone", &single[0]), ("in the batch", &batched[i])] {
            assert_eq!(got.len(), 384);
            let c = cosine(got, &want);
            worst = worst.min(c);
            assert!(c >= 0.9999, "{:?} {what}: cosine {c}", SENTENCES[i]);
        }
    }
    println!("20 sentences, alone and batched: worst cosine to the numpy reference {worst:.7}");
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("floats").iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// `/v1/embeddings` over HTTP (`--task embed`): the 20 sentences in one request and one by one
/// equal the reference; token ids equal their text; base64 decodes to the same floats; usage
/// counts the tokens; `dimensions` only where the model allows; chat on an embedding model and
/// embeddings on a generative one are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embeddings_endpoint_serves_minilm() {
    let dir = minilm();
    let reference = reference(&dir);
    let running = tessera::launch(serve_args(&dir, &["--task", "embed", "--served-model-name", "minilm"]))
        .await
        .expect("the embedding worker starts");
    let (c, url) = (client(), format!("http://{}/v1/embeddings", running.addr));
    let post = |body: Value| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c.post(url).json(&body).send().await.expect("response");
            (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
        }
    };
    let (status, all) = post(json!({"model": "minilm", "input": SENTENCES})).await;
    assert_eq!(status, 200, "{all}");
    let tokens: usize = reference.iter().map(|r| r["ids"].as_array().unwrap().len()).sum();
    assert_eq!(all["usage"]["prompt_tokens"], tokens, "{}", all["usage"]);
    for (i, r) in reference.iter().enumerate() {
        let want: Vec<f64> = serde_json::from_value(r["embedding"].clone()).unwrap();
        assert_eq!(all["data"][i]["index"], i);
        let c1 = cosine(&floats(&all["data"][i]["embedding"]), &want);
        let (status, one) = post(json!({"model": "minilm", "input": SENTENCES[i], "encoding_format": "base64"})).await;
        assert_eq!(status, 200, "{one}");
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(one["data"][0]["embedding"].as_str().unwrap()).unwrap();
        let single: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let c2 = cosine(&single, &want);
        assert!(c1 >= 0.9999 && c2 >= 0.9999, "{:?}: batched {c1}, alone {c2}", SENTENCES[i]);
    }
    let ids = reference[2]["ids"].clone();
    let (status, by_ids) = post(json!({"model": "minilm", "input": ids, "dimensions": 384})).await;
    assert_eq!(status, 200, "{by_ids}");
    let by_text = floats(&all["data"][2]["embedding"]);
    let want: Vec<f64> = by_text.iter().map(|&x| x as f64).collect();
    assert!(cosine(&floats(&by_ids["data"][0]["embedding"]), &want) > 0.99999);
    for (body, param) in [
        (json!({"model": "minilm", "input": "x", "dimensions": 128}), "dimensions"),
        (json!({"model": "minilm", "input": []}), "input"),
        (json!({"model": "minilm", "input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"model": "minilm", "input": [[1, 2, 999999]]}), "input"),
    ] {
        let (status, v) = post(body.clone()).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{body}: {v}");
    }
    let chat = json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]});
    let r = c.post(format!("http://{}/v1/chat/completions", running.addr)).json(&chat).send().await.unwrap();
    assert_eq!(r.status(), 400);
    running.stop().await.expect("stop");

    let (_gen, base) = start_smollm2(&[]).await;
    let r =
        c.post(format!("{base}/v1/embeddings")).json(&json!({"model": "smollm2", "input": "hi"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("--task embed"), "{v}");
}
