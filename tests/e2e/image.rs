//! `Dockerfile.cuda` without a Docker engine: its stages are checked (CUDA devel image that
//! builds with `--features cuda`, CUDA runtime image, non-root user, `tessera` entrypoint,
//! `/mnt/models`), then its final stage is replayed in a shell under a scratch root — the
//! binary copied where `COPY` puts it, the `RUN` lines run with paths moved under the root
//! (user creation and `chown` skipped) — and the image's own command, and `vllm serve
//! /mnt/models` through the alias, each serve the SmolLM2 fixture mounted at `/mnt/models`.

use std::path::Path;
use std::process::{Command, Stdio};

use tessera_tests::{free_port, smollm2_hf};

struct Stage {
    from: String,
    lines: Vec<(String, String)>,
}

/// Stages of a Dockerfile: instructions with continuations joined, comments dropped.
fn parse(text: &str) -> Vec<Stage> {
    let (mut joined, mut cur) = (vec![], String::new());
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                joined.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: Vec<Stage> = vec![];
    for l in joined {
        let (ins, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
        let (ins, rest) = (ins.to_ascii_uppercase(), rest.trim().to_string());
        if ins == "FROM" {
            stages.push(Stage { from: rest, lines: vec![] });
        } else if let Some(s) = stages.last_mut() {
            s.lines.push((ins, rest));
        }
    }
    stages
}

fn get<'a>(s: &'a Stage, ins: &str) -> Vec<&'a str> {
    s.lines.iter().filter(|(i, _)| i == ins).map(|(_, r)| r.as_str()).collect()
}

fn json_list(v: &str) -> Vec<String> {
    serde_json::from_str(v).unwrap_or_else(|e| panic!("{v:?} is not an exec-form list: {e}"))
}

/// `path` moved under the scratch root when it is one of the image's directories.
fn under(root: &Path, arg: &str) -> String {
    let mut out = arg.to_string();
    for dir in ["/usr/local/bin", "/mnt/models", "/home/tessera"] {
        out = out.replace(dir, &format!("{}{dir}", root.display()));
    }
    out
}

async fn serves(program: &str, args: &[String], root: &Path, home: &str) -> Result<serde_json::Value, String> {
    let port = free_port().to_string();
    let log = root.join(format!("{program}-{port}.log"));
    let path = format!("{}:/usr/bin:/bin", root.join("usr/local/bin").display());
    let mut child = Command::new(root.join("usr/local/bin").join(program))
        .args(args)
        .args(["--port", &port, "--host", "127.0.0.1", "--max-model-len", "512", "--kv-cache-memory", "64MiB"])
        .env("PATH", path)
        .env("HOME", home)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map_err(|e| format!("start {program}: {e}"))?;
    let base = format!("http://127.0.0.1:{port}");
    let start = std::time::Instant::now();
    let result = loop {
        if let Ok(r) = reqwest::get(format!("{base}/v1/models")).await {
            if r.status().is_success() {
                break Ok(r.json().await.unwrap());
            }
        }
        if start.elapsed() > std::time::Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            break Err(format!("{program} never served:\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let _ = (child.kill(), child.wait());
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cuda_image_builds_with_cuda_and_its_entrypoint_serves_as_tessera_and_vllm() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile.cuda");
    let stages = parse(&std::fs::read_to_string(&file).unwrap());
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let (build, last) = (&stages[0], stages.last().unwrap());
    assert!(build.from.contains("-devel-") && build.from.ends_with(" AS build"), "{}", build.from);
    assert!(get(build, "RUN").iter().any(|r| r.contains("cargo build") && r.contains("--features cuda")));
    assert!(last.from.contains("-runtime-"), "{}", last.from);
    assert!(stages.iter().all(|s| !s.from.contains(":latest")));
    let user = get(last, "USER");
    let uid: u32 = user.last().and_then(|u| u.split(':').next()?.parse().ok()).expect("a numeric USER");
    assert_ne!(uid, 0, "runs as non-root");
    let after_user = last.lines.iter().skip_while(|(i, _)| i != "USER").any(|(i, _)| i == "RUN");
    assert!(!after_user, "nothing runs as root-only work after USER");
    let entrypoint = json_list(get(last, "ENTRYPOINT").last().unwrap());
    let cmd = json_list(get(last, "CMD").last().unwrap());
    assert_eq!(entrypoint, ["tessera"]);
    assert!(cmd.iter().any(|a| a == "/mnt/models"), "{cmd:?}");
    let copy = get(last, "COPY");
    assert!(copy.iter().any(|c| c.starts_with("--from=build") && c.ends_with("/usr/local/bin/tessera")), "{copy:?}");

    // Replay the final stage under a scratch root.
    let root = std::env::temp_dir().join(format!("image-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_tessera-worker"), root.join("usr/local/bin/tessera")).unwrap();
    for run in get(last, "RUN") {
        let steps: Vec<String> = run
            .split("&&")
            .map(str::trim)
            .map(|s| {
                if ["useradd", "groupadd", "chown"].iter().any(|c| s.starts_with(c)) {
                    "true".into()
                } else {
                    under(&root, s)
                }
            })
            .collect();
        let status = Command::new("bash").arg("-euc").arg(steps.join(" && ")).current_dir(&root).status().unwrap();
        assert!(status.success(), "RUN {run}");
    }
    assert!(root.join("usr/local/bin/vllm").exists(), "the vllm alias");
    assert!(root.join("mnt/models").is_dir(), "/mnt/models is made");
    std::fs::remove_dir(root.join("mnt/models")).unwrap();
    std::os::unix::fs::symlink(smollm2_hf(), root.join("mnt/models")).unwrap(); // the operator's mount
    let home = get(last, "ENV").iter().find_map(|e| e.strip_prefix("HOME=")).map(|h| under(&root, h)).unwrap();
    std::fs::create_dir_all(&home).unwrap();

    let argv: Vec<String> = entrypoint.iter().chain(&cmd).map(|a| under(&root, a)).collect();
    let program = Path::new(&argv[0]).file_name().unwrap().to_str().unwrap().to_string();
    let models = serves(&program, &argv[1..], &root, &home).await.unwrap();
    assert!(!models["data"].as_array().unwrap().is_empty(), "{models}");
    let vllm: Vec<String> = ["serve", "/mnt/models"].iter().map(|a| under(&root, a)).collect();
    let models = serves("vllm", &vllm, &root, &home).await.unwrap();
    assert!(!models["data"].as_array().unwrap().is_empty(), "{models}");
    let _ = std::fs::remove_dir_all(&root);
}
