//! Load throughput of a multi-GB synthetic safetensors model (f32, several shards with an
//! index): from local disk (mmap) and from the loopback S3 server (`s3s-fs`), whole and as
//! one rank of TP=2; and a whole `fetch`. Compared with `cat FILES > /dev/null`, the disk's (or
//! page cache's) own speed. Caches are dropped before each run when the kernel lets us.
//!
//! `cargo bench -p tessera-benches --bench model_load` (size: `TESSERA_BENCH_GB`, default 2).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tessera_models::{Shard, WeightSource};
use tessera_source::SourceOptions;
use tessera_tests::servers::{self, s3_env};

const ROWS: usize = 2048;
const COLS: usize = 8192;
const PER_SHARD: usize = 8;

fn drop_caches() -> &'static str {
    let ok = std::process::Command::new("sh")
        .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        "cold"
    } else {
        "warm"
    }
}

/// Write the model: `tensors` f32 tensors of ROWS×COLS in shards of PER_SHARD, plus the index.
fn write_model(dir: &Path, tensors: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("model dir");
    let mut files = Vec::new();
    let mut map = serde_json::Map::new();
    let shards = tensors.div_ceil(PER_SHARD);
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let names: Vec<String> =
            (s * PER_SHARD..((s + 1) * PER_SHARD).min(tensors)).map(|i| format!("w.{i}")).collect();
        let size = ROWS * COLS * 4;
        let mut header = serde_json::Map::new();
        for (k, n) in names.iter().enumerate() {
            header.insert(
                n.clone(),
                serde_json::json!({"dtype": "F32", "shape": [ROWS, COLS], "data_offsets": [k * size, (k + 1) * size]}),
            );
            map.insert(n.clone(), file.clone().into());
        }
        let h = serde_json::to_vec(&header).expect("header");
        let mut bytes = Vec::with_capacity(8 + h.len() + names.len() * size);
        bytes.extend_from_slice(&(h.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&h);
        let mut x = 0x9e3779b97f4a7c15u64 ^ s as u64;
        for _ in 0..names.len() * size / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Finite f32 values: clear the exponent's top bit.
            bytes.extend_from_slice(&(x & 0xbfff_ffff_bfff_ffff).to_le_bytes());
        }
        std::fs::write(dir.join(&file), &bytes).expect("write shard");
        files.push(file);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map}).to_string();
    std::fs::write(dir.join("model.safetensors.index.json"), &index).expect("index");
    let config = r#"{"architectures":["LlamaForCausalLM"]}"#;
    std::fs::write(dir.join("config.json"), config).expect("config");
    files
}

/// Read every tensor (whole, or rank 0's half of each for TP=2) through the loader.
fn read_all(dir: &Path, tensors: usize, tp2: bool) -> u64 {
    let src = tessera_loader::SafetensorsSource::open(dir, DType::F32, &Device::Cpu).expect("open");
    let mut bytes = 0;
    for i in 0..tensors {
        let shard = if tp2 { Shard { dim: 0, index: 0, count: 2 } } else { Shard::FULL };
        let w = src.get_shard(&format!("w.{i}"), &[ROWS, COLS], shard).expect("tensor");
        bytes += w.dims().iter().product::<usize>() as u64 * 4;
    }
    bytes
}

fn report(what: &str, cache: &str, bytes: u64, t: Duration) {
    println!(
        "{what:<44} {cache:<5} {:>7.2} GB in {:>6.2}s = {:>5.2} GB/s",
        bytes as f64 / 1e9,
        t.as_secs_f64(),
        bytes as f64 / 1e9 / t.as_secs_f64()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let gb: f64 = std::env::var("TESSERA_BENCH_GB").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let tensors = ((gb * 1e9) / (ROWS * COLS * 4) as f64).ceil() as usize;
    let work = std::env::temp_dir().join("tessera-bench-model-load");
    let _ = std::fs::remove_dir_all(&work);
    let local = work.join("local");
    let files = write_model(&local, tensors);
    let shard_paths: Vec<PathBuf> = files.iter().map(|f| local.join(f)).collect();
    let total: u64 = shard_paths.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    println!(
        "synthetic model: {tensors} f32 tensors of {ROWS}x{COLS} in {} shards, {:.2} GB",
        shard_paths.len(),
        total as f64 / 1e9
    );

    // The S3 server's copy, uploaded with PUT (so the server keeps each object's MD5 ETag).
    let root = work.join("s3");
    std::fs::create_dir_all(root.join("bench")).expect("bucket");
    let server = servers::s3(&root, "127.0.0.1:0".parse().expect("addr"), Duration::ZERO);
    servers::s3_upload(&server, "bench", "model", &local);
    for (k, v) in s3_env(&server) {
        std::env::set_var(k, v);
    }

    let c = drop_caches();
    let t = Instant::now();
    let status = std::process::Command::new("cat").args(&shard_paths).stdout(std::process::Stdio::null()).status();
    assert!(status.is_ok_and(|s| s.success()), "cat");
    report("cat shards > /dev/null", c, total, t.elapsed());

    let c = drop_caches();
    let t = Instant::now();
    let n = read_all(&local, tensors, false);
    report("local disk, whole model", c, n, t.elapsed());

    for (label, tp2) in [("loopback S3, whole model", false), ("loopback S3, one rank of TP=2", true)] {
        let opts = SourceOptions::new(Some(work.join(format!("cache-{tp2}"))));
        let c = drop_caches();
        let t = Instant::now();
        let dir = tessera_source::resolve("s3://bench/model", &opts).expect("resolve");
        let n = read_all(&dir, tensors, tp2);
        report(label, c, n, t.elapsed());
    }

    let c = drop_caches();
    let t = Instant::now();
    let f = tessera_source::fetch("s3://bench/model", &work.join("fetched"), &SourceOptions::new(None)).expect("fetch");
    report("loopback S3, tessera fetch (+ MD5 check)", c, f.downloaded, t.elapsed());
    let _ = std::fs::remove_dir_all(&work);
}
