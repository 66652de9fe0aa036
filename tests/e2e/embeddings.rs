//! all-MiniLM-L6-v2 through the shared layers equals an independent reference: a numpy
//! forward pass written in `tests/python/minilm_reference.py` over the same safetensors,
//! tokenised by Hugging Face's `tokenizers` package (PyPI, `scripts/reference-venv.sh`). 20
//! sentences, one at a time and as one padded batch: cosine ≥ 0.9999 and the same token ids.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use serde_json::Value;
use tessera_tests::minilm;

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

#[test]
fn minilm_embeddings_equal_an_independent_numpy_reference() {
    let dir = minilm();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = Command::new(root.join("scripts/reference-venv.sh")).output().expect("run scripts/reference-venv.sh");
    assert!(venv.status.success(), "reference-venv.sh failed:\n{}", String::from_utf8_lossy(&venv.stderr));
    let python = String::from_utf8_lossy(&venv.stdout).lines().last().expect("python").trim().to_string();
    let mut child = Command::new(python)
        .arg(root.join("tests/python/minilm_reference.py"))
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference");
    child.stdin.take().unwrap().write_all(serde_json::to_string(&SENTENCES).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().expect("the reference");
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let reference: Vec<Value> = serde_json::from_slice(&out.stdout).expect("reference JSON");

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
