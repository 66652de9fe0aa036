//! Gemma 3 270M (the Q4_K_M GGUF from PyPI, a base model) against llama.cpp's own
//! `llama-server` and `llama-perplexity`, built from the PyPI sdist by
//! `benches/serving/llama-cpp.sh`, with llama.cpp's flash attention off: its CPU flash
//! attention accumulates values in f16, which moves llama.cpp's own log-probabilities by up to
//! ~0.2 nats on this model (measured: 2 of the 6 prompts below change their greedy text
//! between llama.cpp's two modes), while its plain attention is computed like ours.
//! - token ids equal llama-server's `/tokenize` (SentencePiece from the GGUF metadata);
//! - greedy text over `/v1/completions` equals llama-server's on the first 16 tokens of at
//!   least 4 of 6 prompts, and where it differs the first differing token is a near tie in
//!   llama.cpp's own distribution (the two tokens within 0.1 nats);
//! - perplexity over the same text and chunks within 1% of `llama-perplexity`'s;
//! - chat without a chat template (the GGUF has none) is a clear 400.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::{client, free_port, gemma3_gguf, llama_cpp_bin, serve_args};

const PROMPTS: [&str; 6] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
];

/// llama.cpp's arguments shared by the server and the perplexity tool: two threads, plain attention.
const LLAMA_ARGS: [&str; 4] = ["-t", "2", "-fa", "off"];

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = (self.0.kill(), self.0.wait());
    }
}

async fn llama_server(bin: &Path, model: &Path) -> (Killed, String) {
    let port = free_port().to_string();
    let child = Command::new(bin.join("llama-server"))
        .env("LD_LIBRARY_PATH", bin)
        .args(["-m", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", &port, "-c", "4096", "-np", "1"])
        .args(LLAMA_ARGS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llama-server");
    let (child, base) = (Killed(child), format!("http://127.0.0.1:{port}"));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if client().get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return (child, base);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("llama-server never became healthy");
}

async fn post(url: String, body: Value) -> Value {
    let r = client().post(&url).json(&body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_matches_llama_cpp_tokens_greedy_text_and_perplexity() {
    let (bin, model) = (llama_cpp_bin(), gemma3_gguf());
    let (_llama, lbase) = llama_server(&bin, &model).await;
    let args = serve_args(&model, &["--served-model-name", "gemma", "--max-model-len", "2048"]);
    let running = tessera::launch(args).await.expect("the worker serves Gemma 3");
    let base = format!("http://{}", running.addr);

    // Tokenization: the same ids as llama.cpp (BOS added, spaces, newlines, digits, UTF-8).
    for text in [
        "The capital of France is",
        "Hello world!\n\nThis is   a test of  spaces, numbers 12345 and émojis 🙂.",
        "def fibonacci(n):\n    if n < 2:\n        return n\n\n\n",
        "<start_of_turn>user\nWhy?<end_of_turn>",
    ] {
        let theirs = post(format!("{lbase}/tokenize"), json!({"content": text, "add_special": true})).await;
        let ours = post(format!("{base}/tokenize"), json!({"model": "gemma", "prompt": text})).await;
        assert_eq!(ours["tokens"], theirs["tokens"], "token ids of {text:?}");
    }

    // Greedy text, 16 tokens per prompt.
    let mut equal = 0;
    for p in PROMPTS {
        let theirs = post(
            format!("{lbase}/completion"),
            json!({"prompt": p, "n_predict": 16, "temperature": 0, "top_k": 1, "n_probs": 5, "cache_prompt": false}),
        )
        .await;
        let ours = post(
            format!("{base}/v1/completions"),
            json!({"model": "gemma", "prompt": p, "max_tokens": 16, "temperature": 0, "logprobs": 5}),
        )
        .await;
        let probs = theirs["completion_probabilities"].as_array().expect("llama.cpp's token probabilities");
        let their_tokens: Vec<&str> = probs.iter().map(|t| t["token"].as_str().unwrap()).collect();
        let our_tokens: Vec<&str> =
            ours["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        println!("{p:?}\n  llama.cpp: {:?}\n  tessera:   {:?}", theirs["content"], ours["choices"][0]["text"]);
        match (0..16).find(|&i| their_tokens.get(i) != our_tokens.get(i)) {
            None => equal += 1,
            Some(i) => {
                // A near tie: our token is among llama.cpp's top 5 there, within 0.1 nats of its pick.
                let top: HashMap<&str, f64> = probs[i]["top_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t["token"].as_str().unwrap(), t["logprob"].as_f64().unwrap()))
                    .collect();
                let (theirs_lp, ours_lp) = (top[their_tokens[i]], top.get(our_tokens[i]).copied());
                let gap = ours_lp.map(|o| theirs_lp - o);
                println!("  first difference at token {i}: llama.cpp's log-probabilities {top:?} (gap {gap:?} nats)");
                assert!(gap.is_some_and(|g| g < 0.1), "{p:?}: token {i} is not a near tie in llama.cpp ({top:?})");
            }
        }
    }
    println!("greedy text equal on the first 16 tokens of {equal} of {} prompts", PROMPTS.len());
    assert!(equal >= 4, "greedy text equal on only {equal} of 6 prompts");

    // Perplexity over the same chunks of 512 tokens (the second half of each scored).
    let text = std::env::temp_dir().join(format!("gemma-ppl-{}.txt", std::process::id()));
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/architecture.md")).unwrap();
    std::fs::write(&text, doc.chars().take(16_000).collect::<String>()).unwrap();
    let out = Command::new(bin.join("llama-perplexity"))
        .env("LD_LIBRARY_PATH", &bin)
        .args(["-m", model.to_str().unwrap(), "-f", text.to_str().unwrap(), "-c", "512"])
        .args(LLAMA_ARGS)
        .output()
        .expect("run llama-perplexity");
    let log = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let theirs: f64 = log
        .split("Final estimate: PPL = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no perplexity in llama-perplexity's output:\n{log}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/serving/perplexity.py");
    let ours = Command::new("python3")
        .args([script, text.to_str().unwrap(), "--url", &base, "--tokenizer-url", &lbase, "--ctx", "512"])
        .args(["--model", "gemma"])
        .output()
        .expect("run perplexity.py");
    assert!(ours.status.success(), "perplexity.py: {}", String::from_utf8_lossy(&ours.stderr));
    let ours: Value = serde_json::from_slice(&ours.stdout).unwrap();
    let ppl = ours["ppl"].as_f64().unwrap();
    let rel = (ppl - theirs) / theirs;
    println!("perplexity: tessera {ppl:.4}, llama-perplexity {theirs:.4} ({:+.2}%, {ours})", rel * 100.0);
    assert!(ours["chunks"].as_u64().unwrap() >= 4, "{ours}");
    assert!(rel.abs() < 0.01, "perplexity {ppl} is not within 1% of llama.cpp's {theirs}");

    // A base model has no chat template: chat says how to give one.
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "gemma", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body = r.bytes().await.unwrap();
    tessera_tests::assert_openai_error(400, &body, "chat without a template");
    assert!(String::from_utf8_lossy(&body).contains("--chat-template"));
    running.stop().await.unwrap();
    let _ = std::fs::remove_file(&text);
}
