//! Model sources against real servers on loopback: an S3-compatible server (`s3s-fs`), a
//! static file server and a hub imitation. Each test takes the environment lock, because
//! store credentials and endpoints come from environment variables, as in a pod.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_source::{FetchOptions, SourceOptions};
use tessera_tests::servers::{self, s3_env};
use tessera_tests::tiny::{tiny_weights, write_hf, TinyShape};
use tessera_tests::{client, serve_args, smollm2_hf};

static ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VARS: [&str; 9] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "TESSERA_PROGRESS_INTERVAL",
];

/// Hold the lock and set exactly `vars` (the other store variables unset).
async fn env(vars: &[(&str, String)]) -> tokio::sync::MutexGuard<'static, ()> {
    let g = ENV.lock().await;
    set_vars(vars);
    g
}

/// [`env`] for a test that is not async.
fn env_blocking(vars: &[(&str, String)]) -> tokio::sync::MutexGuard<'static, ()> {
    let g = ENV.blocking_lock();
    set_vars(vars);
    g
}

fn set_vars(vars: &[(&str, String)]) {
    for v in VARS {
        std::env::remove_var(v);
    }
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
}

/// A fresh folder for this test process. The folders live as long as the process's tests
/// need them; the first call of a process removes those left by earlier runs whose process
/// has ended (each run stores ~1 GiB of models and S3 copies).
fn scratch(name: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("tessera-src-").and_then(|r| r.split('-').next()?.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = std::env::temp_dir().join(format!("tessera-src-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A fresh S3 server (bucket `models`) holding `models`: (key, local folder) pairs.
fn s3_with(models: &[(&str, &Path)], delay: Duration) -> (servers::Server, PathBuf) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let root = scratch(&format!("s3-root-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    std::fs::create_dir_all(root.join("models")).expect("bucket");
    let server = servers::s3(&root, "127.0.0.1:0".parse().expect("addr"), delay);
    for (key, dir) in models {
        servers::s3_upload(&server, "models", key, dir);
    }
    (server, root)
}

/// A tiny llama (8 heads, 4 KV heads) with SmolLM2's tokenizer, so it can serve HTTP.
fn tiny_model(name: &str, shards: usize) -> PathBuf {
    let dir = scratch(name);
    let s = TinyShape { vocab: 49152, hidden: 128, inter: 256, ..TinyShape::default() };
    write_hf(&dir, s, &tiny_weights(s), shards);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(smollm2_hf().join(f), dir.join(f)).expect("tokenizer files");
    }
    dir
}

/// A web root holding `tiny/` (the tiny llama in 2 shards with an index) and `smollm2.gguf`.
fn web_root(name: &str) -> PathBuf {
    let dir = scratch(&format!("{name}-root"));
    let tiny = tiny_model(&format!("{name}-tiny"), 2);
    std::fs::rename(&tiny, dir.join("tiny")).expect("move the model under the web root");
    std::fs::copy(tessera_tests::smollm2_gguf(), dir.join("smollm2.gguf")).expect("gguf");
    dir
}

async fn greedy(base: &str, prompt: &str, n: usize) -> String {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true});
    let r = client().post(format!("{base}/v1/completions")).json(&body).send().await.expect("request");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// Serve `uri` in-process with `extra` flags; the greedy text for a prompt and the bytes each
/// rank asked for from remote files under `cache`.
async fn serve_and_measure(uri: &str, cache: &Path, extra: &[&str]) -> (String, Vec<(u64, u64)>) {
    let cache_s = cache.display().to_string();
    let mut flags = vec!["--download-dir", cache_s.as_str(), "--max-model-len", "256"];
    flags.extend_from_slice(extra);
    let t0 = Instant::now();
    let running = tessera::launch(serve_args(Path::new(uri), &flags)).await.expect("worker starts from the URI");
    println!("{uri} {extra:?}: loaded in {:.1}s", t0.elapsed().as_secs_f64());
    let text = greedy(&format!("http://{}", running.addr), "The capital of France is", 12).await;
    running.stop().await.expect("stop");
    let prefix = cache.display().to_string();
    let per_rank = tessera_source::reader_stats()
        .into_iter()
        .filter(|(what, req, _)| what.starts_with(&prefix) && *req > 0)
        .map(|(_, req, got)| (req, got))
        .collect();
    (text, per_rank)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_models_serve_and_each_tensor_parallel_rank_reads_only_its_share() {
    let tiny = tiny_model("s3-tiny", 1);
    let (server, _) = s3_with(&[("smollm2", &smollm2_hf()), ("tiny", &tiny)], Duration::ZERO);
    let _g = env(&s3_env(&server)).await;
    let file_size = std::fs::metadata(smollm2_hf().join("model.safetensors")).expect("size").len();

    // SmolLM2 from S3 serves the same greedy text as from the local folder, reading every byte once.
    let (text, ranks) = serve_and_measure("s3://models/smollm2", &scratch("cache-smol"), &[]).await;
    let (local, _) = serve_and_measure(smollm2_hf().to_str().expect("path"), &scratch("cache-local"), &[]).await;
    println!("SmolLM2 from S3: {text:?}, ranks {ranks:?} (file {file_size} bytes)");
    assert_eq!(text, local, "S3 serves the local folder's greedy text");
    assert_eq!(ranks.len(), 1);
    assert!(ranks[0].0 > file_size * 99 / 100 && ranks[0].0 <= file_size, "TP=1 reads the whole model: {ranks:?}");
    assert_eq!(ranks[0].0, ranks[0].1, "a cold cache downloads what it reads");

    // The tiny llama (8 heads): TP=2 ranks read about half of TP=1's bytes.
    let (t1, tiny1) = serve_and_measure("s3://models/tiny", &scratch("cache-tiny1"), &[]).await;
    let (t2, tiny2) =
        serve_and_measure("s3://models/tiny", &scratch("cache-tiny2"), &["--tensor-parallel-size", "2"]).await;
    println!("tiny from S3: TP=1 {tiny1:?}; TP=2 {tiny2:?}; texts {t1:?} {t2:?}");
    assert_eq!(t1, t2, "TP=2 from S3 serves TP=1's greedy text");
    assert_eq!(tiny2.len(), 2);
    let downloaded: u64 = tiny2.iter().map(|r| r.1).sum();
    assert!(downloaded <= tiny1[0].1, "no byte is downloaded twice: {downloaded} of {}", tiny1[0].1);
    for (req, _) in &tiny2 {
        let share = *req as f64 / tiny1[0].0 as f64;
        assert!((0.45..0.60).contains(&share), "a TP=2 rank reads about half: {share:.3}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gguf_and_file_uris_load_and_serve() {
    let dir = web_root("http");
    let web = servers::static_files(&dir);
    let _g = env(&[]).await;
    let cache = scratch("http-cache");
    let (sharded, ranks) = serve_and_measure(&format!("{}/tiny", web.url()), &cache, &[]).await;
    let (tiny_local, _) = serve_and_measure(dir.join("tiny").to_str().expect("path"), &cache, &[]).await;
    assert_eq!(ranks.len(), 1, "the 2-shard model (index, no listing) serves: {ranks:?}");
    assert_eq!(sharded, tiny_local, "http:// serves the local folder's greedy text");
    let (from_http, _) = serve_and_measure(&format!("{}/smollm2.gguf", web.url()), &cache, &[]).await;
    let (from_path, _) = serve_and_measure(tessera_tests::smollm2_gguf().to_str().expect("path"), &cache, &[]).await;
    let file_uri = format!("file://{}", tessera_tests::smollm2_gguf().display());
    let (from_file_uri, _) = serve_and_measure(&file_uri, &cache, &[]).await;
    println!("GGUF over http: {from_http:?}; path: {from_path:?}; file://: {from_file_uri:?}");
    assert_eq!(from_http, from_path);
    assert_eq!(from_file_uri, from_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_without_range_support_serve_and_fetch_whole_files() {
    let dir = web_root("norange");
    let web = servers::static_files_without_ranges(&dir);
    let _g = env(&[]).await;
    // `tessera fetch` of a GGUF file and of a 2-shard safetensors folder (with its index).
    for (uri, name, files) in [
        (format!("{}/smollm2.gguf", web.url()), "gguf", vec!["smollm2.gguf"]),
        (
            format!("{}/tiny", web.url()),
            "tiny",
            vec![
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ],
        ),
    ] {
        let out = scratch(&format!("norange-fetch-{name}"));
        let run = std::process::Command::new(BIN).arg("fetch").arg(&uri).arg(&out).output().expect("run tessera fetch");
        let log = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "fetch {uri} failed: {log}");
        assert!(log.contains("does not serve byte ranges"), "the log says ranges were not available: {log}");
        for f in files {
            let src = if name == "gguf" { dir.join(f) } else { dir.join("tiny").join(f) };
            let same = std::fs::read(out.join(f)).ok() == std::fs::read(&src).ok();
            assert!(same, "{uri}: fetched {f} equals the source");
        }
    }
    // `serve` of the same URIs (the safetensors folder is read lazily, so it falls back to
    // one whole download per shard) gives the local copies' greedy text.
    let cache = scratch("norange-cache");
    let (gguf, _) = serve_and_measure(&format!("{}/smollm2.gguf", web.url()), &cache, &[]).await;
    let (gguf_local, _) = serve_and_measure(dir.join("smollm2.gguf").to_str().expect("path"), &cache, &[]).await;
    assert_eq!(gguf, gguf_local, "GGUF over a server without ranges serves the local file's text");
    let (tiny_http, ranks) = serve_and_measure(&format!("{}/tiny", web.url()), &cache, &[]).await;
    let (tiny_local, _) = serve_and_measure(dir.join("tiny").to_str().expect("path"), &cache, &[]).await;
    assert_eq!(tiny_http, tiny_local, "safetensors over a server without ranges serves the local folder's text");
    assert_eq!(ranks.len(), 1, "{ranks:?}");
    // The lazily read shards fell back to whole downloads: the mirrors are complete copies.
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let mirror = find_file(&cache, f).unwrap_or_else(|| panic!("{f} mirrored under {}", cache.display()));
        let same = std::fs::read(&mirror).ok() == std::fs::read(dir.join("tiny").join(f)).ok();
        assert!(same, "the mirror {} equals the source", mirror.display());
    }
}

/// The first file named `name` under `dir` (depth-first).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_uris_resolve_through_the_hub_layout_with_a_token_and_verified_checksums() {
    let tiny = tiny_model("hub-tiny", 1);
    let hub = servers::hub("acme/tiny", "v1", &tiny, Some("secret-token"));
    let _g = env(&[("HF_ENDPOINT", hub.url()), ("HF_TOKEN", "secret-token".into())]).await;
    let (text, ranks) = serve_and_measure("hf://acme/tiny@v1", &scratch("hub-cache"), &[]).await;
    let (local, _) = serve_and_measure(tiny.to_str().expect("path"), &scratch("hub-local"), &[]).await;
    assert_eq!(ranks.len(), 1);
    assert_eq!(text, local, "hf:// serves the local folder's greedy text");
    // The whole model with `fetch`: the weights' SHA-256 (the CDN's ETag) is checked.
    let out = scratch("hub-fetch");
    let fetched = tessera_source::fetch("hf://acme/tiny@v1", &out, &SourceOptions::new(None)).expect("fetch");
    assert_eq!(fetched.verified, 1, "the safetensors file's sha256 was verified");
    let same = std::fs::read(out.join("model.safetensors")).ok() == std::fs::read(tiny.join("model.safetensors")).ok();
    assert!(same, "fetched bytes equal the hub's");
    // A wrong revision is a 404 naming the URI; a missing token says which credential.
    let e = tessera_source::fetch("hf://acme/tiny@v2", &scratch("hub-v2"), &SourceOptions::new(None)).err();
    let e = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("hf://acme/tiny@v2") && e.contains("config.json"), "{e}");
    std::env::remove_var("HF_TOKEN");
    let e = tessera_source::fetch("hf://acme/tiny@v1", &scratch("hub-notoken"), &SourceOptions::new(None)).err();
    let e = e.map(|e| e.to_string()).unwrap_or_default();
    println!("without a token: {e}");
    assert!(e.contains("access denied") && e.contains("HF_TOKEN"), "{e}");
}

fn quick() -> SourceOptions {
    let mut o = SourceOptions::new(None);
    o.fetch = FetchOptions {
        concurrency: 2,
        chunk: 1 << 20,
        attempts: 3,
        backoff: Duration::from_millis(100),
        merge_gap: 256,
    };
    o
}

#[test]
fn a_server_dying_mid_download_fails_after_bounded_retries_and_the_next_fetch_resumes() {
    let (server, root) = s3_with(&[("smollm2", &smollm2_hf())], Duration::from_millis(20));
    let addr = server.addr;
    let _g = env_blocking(&s3_env(&server));
    let out = scratch("die-out");
    let side = out.join(".tessera/model.safetensors.json");
    let killer = std::thread::spawn(move || {
        // Kill once a few MiB of the weights are down.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            let held = std::fs::read(&side)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| {
                    v["held"]
                        .as_array()
                        .map(|a| a.iter().map(|r| r[1].as_u64().unwrap_or(0) - r[0].as_u64().unwrap_or(0)).sum::<u64>())
                })
                .unwrap_or(0);
            if held >= 4 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        server.kill();
    });
    let t0 = Instant::now();
    let e =
        tessera_source::fetch("s3://models/smollm2", &out, &quick()).err().map(|e| e.to_string()).unwrap_or_default();
    let took = t0.elapsed();
    killer.join().expect("killer");
    println!("after the kill ({took:?}): {e}");
    assert!(e.contains("s3://models/smollm2/model.safetensors") && e.contains("gave up after 3 attempts"), "{e}");
    assert!(took < Duration::from_secs(30), "bounded: {took:?}");
    // The half-downloaded folder is refused, never read with holes as zeros.
    let e = tessera_loader::SafetensorsSource::open(&out, candle_core::DType::F32, &candle_core::Device::Cpu).err();
    let e = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("model.safetensors") && e.contains("only partly downloaded"), "{e}");
    // The same server comes back: the fetch resumes and the MD5 ETag checks the whole file.
    let _server = servers::s3(&root, addr, Duration::ZERO);
    let fetched = tessera_source::fetch("s3://models/smollm2", &out, &quick()).expect("resumed fetch");
    println!("resumed: {} of {} bytes downloaded, {} verified", fetched.downloaded, fetched.total, fetched.verified);
    assert!(fetched.downloaded < fetched.total && fetched.downloaded > 0, "resumed, not restarted");
    assert!(fetched.verified >= 1, "the md5 checksum was verified");
    let same =
        std::fs::read(out.join("model.safetensors")).ok() == std::fs::read(smollm2_hf().join("model.safetensors")).ok();
    assert!(same, "the resumed file equals the original");
    let again = tessera_source::fetch("s3://models/smollm2", &out, &quick()).expect("a second fetch");
    assert_eq!(again.downloaded, 0, "a rerun on a complete folder downloads nothing");
}

/// Load `uri` in-process and return the start-up error.
async fn load_error(uri: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cache = scratch(&format!("err-cache-{n}")).display().to_string();
    match tessera::launch(serve_args(Path::new(uri), &["--download-dir", &cache, "--max-model-len", "256"])).await {
        Ok(_) => panic!("{uri} loaded"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_models_and_bad_stores_give_errors_naming_what_is_wrong() {
    let root = scratch("bad-models");
    let tiny = tiny_model("bad-tiny", 1);
    let st = std::fs::read(tiny.join("model.safetensors")).expect("weights");
    let n = u64::from_le_bytes(st[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).expect("header");
    let victim = header
        .as_object()
        .and_then(|m| m.keys().find(|k| k.ends_with("mlp.down_proj.weight")).cloned())
        .expect("a tensor");
    let put = |key: &str, edit: &dyn Fn(&Path)| {
        let d = root.join(key);
        std::fs::create_dir_all(&d).expect("mkdir");
        for e in std::fs::read_dir(&tiny).expect("tiny").flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).expect("copy");
        }
        edit(&d);
    };
    // A header that lies: the victim's end offset moved by one element.
    put("lying", &|d| {
        let mut h = header.clone();
        let offs = &mut h[&victim]["data_offsets"];
        offs[1] = json!(offs[1].as_u64().unwrap_or(0) - 4);
        let text = serde_json::to_vec(&h).expect("json");
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&st[8 + n..]);
        std::fs::write(d.join("model.safetensors"), out).expect("write");
    });
    put("truncated", &|d| std::fs::write(d.join("model.safetensors"), &st[..st.len() - 1000]).expect("write"));
    put("noconfig", &|d| std::fs::remove_file(d.join("config.json")).expect("rm"));
    put("badindex", &|d| {
        let index = json!({"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).expect("index");
    });
    put("badshape", &|d| {
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).expect("cfg")).expect("json");
        c["intermediate_size"] = json!(200);
        std::fs::write(d.join("config.json"), c.to_string()).expect("cfg");
    });
    let keys = ["lying", "truncated", "noconfig", "badindex", "badshape"].map(|k| (k, root.join(k)));
    let (server, _) = s3_with(&keys.iter().map(|(k, d)| (*k, d.as_path())).collect::<Vec<_>>(), Duration::ZERO);
    let _g = env(&s3_env(&server)).await;
    let cases: [(&str, &[&str]); 5] = [
        ("lying", &[victim.as_str(), "the header lies"]),
        ("truncated", &["s3://models/truncated/model.safetensors", "truncated"]),
        ("noconfig", &["s3://models/noconfig", "no config.json"]),
        ("badindex", &["model-00002-of-00002.safetensors", "missing"]),
        ("badshape", &["mlp", "200"]),
    ];
    for (key, says) in cases {
        let e = load_error(&format!("s3://models/{key}")).await;
        println!("{key}: {e}");
        for s in says {
            assert!(e.contains(s), "{key}: `{s}` not in: {e}");
        }
    }
    // Wrong secret: 403, and the message says which credentials.
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "wrong");
    let e = load_error("s3://models/lying").await;
    println!("wrong key: {e}");
    assert!(e.contains("access denied") && e.contains("AWS_ACCESS_KEY_ID"), "{e}");
    // Nothing listens: bounded retries, then an error naming the URI.
    let dead = tessera_tests::free_port();
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{dead}"));
    let t0 = Instant::now();
    let e = tessera_source::resolve("s3://models/lying", &quick()).err().map(|e| e.to_string()).unwrap_or_default();
    println!("unreachable ({:?}): {e}", t0.elapsed());
    assert!(e.contains("s3://models/lying") && e.contains("gave up after 3 attempts"), "{e}");
}

const BIN: &str = env!("CARGO_BIN_EXE_tessera-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_command_logs_progress_and_a_restarted_worker_downloads_nothing_again() {
    let tiny = tiny_model("proc-tiny", 2);
    let (server, _) = s3_with(&[("smollm2", &smollm2_hf()), ("tiny", &tiny)], Duration::from_millis(2));
    let vars = s3_env(&server);
    let _g = env(&[]).await;
    let mut envs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    envs.push(("TESSERA_PROGRESS_INTERVAL", "0.2"));
    // `tessera fetch`, as the storage-initializer init container runs it.
    let out = scratch("cli-fetch");
    let run = std::process::Command::new(BIN)
        .args(["fetch", "s3://models/smollm2"])
        .arg(&out)
        .envs(envs.iter().copied())
        .output()
        .expect("run tessera fetch");
    let log = String::from_utf8_lossy(&run.stderr);
    println!("{log}");
    assert!(run.status.success(), "fetch failed: {log}");
    assert!(log.contains("ETA") && log.contains("GB/s") && log.contains("5 file(s) checksum-verified"), "{log}");
    let same =
        std::fs::read(out.join("model.safetensors")).ok() == std::fs::read(smollm2_hf().join("model.safetensors")).ok();
    assert!(same, "the fetched weights equal the original");
    // A worker started twice on the same cache: the second start downloads nothing.
    let cache = scratch("cli-cache").display().to_string();
    let flags = ["--download-dir", cache.as_str(), "--max-model-len", "256"];
    let mut logs = Vec::new();
    for _ in 0..2 {
        let mut w =
            tessera_tests::WorkerProcess::start_with_env(BIN, Path::new("s3://models/tiny"), &flags, &envs).await;
        logs.push(w.log_text());
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    let line =
        |l: &str| l.lines().find(|l| l.contains("weights read from the remote copy")).unwrap_or_default().to_string();
    println!("first: {}\nsecond: {}", line(&logs[0]), line(&logs[1]));
    assert!(line(&logs[0]).contains("MiB downloaded"), "{}", logs[0]);
    assert!(line(&logs[1]).contains("(0 B downloaded"), "{}", logs[1]);
}
