//! With the `cuda` feature only: compile the CUDA kernels (`cuda/*.cu`) with nvcc, one fatbin per
//! source holding SASS for sm_80 and sm_90 (and `CUDA_COMPUTE_CAP`'s when set) plus compute_80
//! PTX that newer GPUs compile at load, and one PTX text per source (the tests read the entry
//! points from it). nvcc: `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH
//! (`scripts/cuda-toolkit.sh` provides one from NVIDIA's PyPI wheels).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 3] = ["attention", "cache", "fused"];

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    "nvcc".into()
}

/// The SASS targets: 80 and 90 always, plus `CUDA_COMPUTE_CAP` ("89", "8.9", "90a").
fn archs() -> Vec<String> {
    let mut out = vec!["80".to_string(), "90".to_string()];
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        let cap: String = cap.chars().filter(|c| *c != '.').collect();
        if !cap.is_empty() && cap.chars().all(|c| c.is_ascii_alphanumeric()) && !out.contains(&cap) {
            out.push(cap);
        }
    }
    out
}

fn run(mut cmd: Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {:?} ({e}); install the CUDA toolkit or run scripts/cuda-toolkit.sh", cmd.get_program())
    });
    assert!(status.success(), "nvcc failed on {what}: {cmd:?}");
}

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    for var in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_HOME", "CUDA_PATH", "CARGO_FEATURE_CUDA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let archs = archs();
    let nvcc = nvcc();
    for src in SOURCES {
        let input = format!("cuda/{src}.cu");
        let mut fatbin = Command::new(&nvcc);
        fatbin.args(["--fatbin", "-O3", "-std=c++17", "-Icuda"]);
        for a in &archs {
            let virt: String = a.chars().filter(char::is_ascii_digit).collect();
            fatbin.args(["-gencode", &format!("arch=compute_{virt},code=sm_{a}")]);
        }
        fatbin.args(["-gencode", "arch=compute_80,code=compute_80", "-o"]);
        fatbin.arg(out.join(format!("{src}.fatbin"))).arg(&input);
        run(fatbin, &input);
        let mut ptx = Command::new(&nvcc);
        ptx.args(["--ptx", "-arch=compute_80", "-std=c++17", "-Icuda", "-o"]);
        ptx.arg(out.join(format!("{src}.ptx"))).arg(&input);
        run(ptx, &input);
    }
    let list: Vec<String> = archs.iter().map(|a| format!("{a:?}")).collect();
    let consts = format!("/// The SASS targets in every fatbin.\npub const ARCHS: &[&str] = &[{}];\n", list.join(", "));
    std::fs::write(out.join("cuda_archs.rs"), consts).expect("write cuda_archs.rs");
}
