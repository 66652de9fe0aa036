//! The official `openai` Python client (PyPI, pinned in `scripts/openai-venv.sh`) drives the
//! SmolLM2 worker: chat, completions, streaming with usage, n=3, logprobs, stop, seed, errors
//! structured outputs with a pydantic model, and a tool-calling round trip (`tests/python/openai_client.py`
//! holds the checks).

use std::path::Path;
use std::process::Command;

use tessera_tests::{serve_args, smollm2_gguf};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = Command::new(root.join("scripts/openai-venv.sh")).output().expect("run scripts/openai-venv.sh");
    assert!(venv.status.success(), "openai-venv.sh failed:\n{}", String::from_utf8_lossy(&venv.stderr));
    let stdout = String::from_utf8_lossy(&venv.stdout);
    let python = stdout.lines().last().expect("the venv's python").trim().to_string();

    // SmolLM2's own template, plus tools in the Hermes style (tests/fixtures/chatml_tools.jinja).
    let template = root.join("tests/fixtures/chatml_tools.jinja");
    let flags = ["--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"];
    let mut args: Vec<&str> = flags.to_vec();
    let template = template.to_str().expect("utf-8 path");
    args.extend(["--chat-template", template]);
    let running = tessera::launch(serve_args(&smollm2_gguf(), &args)).await.expect("worker");
    let base = format!("http://{}/v1", running.addr);
    let script = root.join("tests/python/openai_client.py");
    let out = tokio::task::spawn_blocking(move || Command::new(python).arg(script).args([&base, "smollm2"]).output())
        .await
        .expect("join")
        .expect("run the client script");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "the openai client checks failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
    running.stop().await.expect("stop");
}
