//! Render and run: the operator's Deployment for KServe's opt-125m sample (our presets), its
//! `main` container's command, args and env run as a local process, with `/mnt/models` (the
//! volume mount) pointed at the SmolLM2 fixture and `--port` at a free port; `/health` and
//! `/v1/models` answer.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Container;
use kube::ResourceExt;
use tessera_operator::api::LLMInferenceService;
use tessera_operator::combine::{combine, config_names};
use tessera_operator::template::GlobalConfig;
use tessera_operator::{presets, render};
use tessera_tests::{free_port, smollm2_hf};

fn rendered_main_container() -> Container {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../operator/tests/fixtures/kserve/samples/opt-125m-cpu/llm-inference-service-facebook-opt-125m-cpu-no-scheduler.yaml"
    );
    let mut svc: LLMInferenceService = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    svc.metadata.namespace = Some("team-a".into());
    svc.metadata.uid = Some("uid-1".into());
    let all = presets::shipped("tessera:test").unwrap();
    let configs: Vec<_> =
        config_names(&svc).iter().map(|n| all.iter().find(|p| &p.name_any() == n).cloned().unwrap()).collect();
    let spec = combine(&svc, &configs, &GlobalConfig::default()).unwrap();
    let d = render::main_deployment(&svc, &spec).unwrap();
    d.spec.template.spec.unwrap().containers.into_iter().find(|c| c.name == "main").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_worker_command_serves() {
    let main = rendered_main_container();
    let command = main.command.clone().unwrap();
    assert_eq!(command[0], "tessera", "the preset runs the tessera binary");
    let port = free_port().to_string();
    let model = smollm2_hf();
    let model = model.to_str().unwrap();
    let mut argv: Vec<String> = command[1..].iter().chain(main.args.iter().flatten()).cloned().collect();
    let port_at = argv.iter().position(|a| a == "--port").unwrap() + 1;
    argv[port_at] = port.clone();
    for a in argv.iter_mut().filter(|a| a.as_str() == render::MODEL_DIR) {
        *a = model.to_string();
    }
    argv.extend(["--host", "127.0.0.1", "--max-model-len", "512", "--kv-cache-memory", "64MiB"].map(String::from));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera-worker"));
    cmd.args(&argv).stdout(Stdio::null()).stderr(Stdio::piped());
    for e in main.env.iter().flatten() {
        cmd.env(&e.name, e.value.clone().unwrap_or_default());
    }
    let home = std::env::temp_dir().join(format!("render-run-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    cmd.env("HOME", &home); // the pod's HOME is an emptyDir at /home
    let mut child = cmd.spawn().expect("start the worker");

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let start = Instant::now();
    let healthy = loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                break true;
            }
        }
        if start.elapsed() > Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let models: serde_json::Value = match healthy {
        true => http.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap(),
        false => serde_json::Value::Null,
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(healthy, "worker never became healthy: {argv:?}\n{}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"facebook/opt-125m"), "{ids:?}");
    assert!(ids.contains(&"publishers/team-a/models/facebook/opt-125m"), "{ids:?}");
}
