//! Render and run: the operator's Deployments for KServe's opt-125m samples (our presets),
//! their `main` containers' command, args and env run as local processes, with `/mnt/models`
//! (the volume mount) pointed at the SmolLM2 fixture and `--port` at a free port: the
//! single-node worker answers `/health` and `/v1/models`; the prefill/decode pair splits a
//! request sent to the decode worker with `x-prefiller-host-port`; a service with two LoRA
//! adapters renders their storage (an init container for a download, a mounted claim) and
//! `--lora-modules`, and the rendered worker serves both adapters.

use std::process::{Command, Stdio};

#[path = "image.rs"]
mod image;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use kube::ResourceExt;
use tessera_operator::api::LLMInferenceService;
use tessera_operator::combine::{combine, config_names};
use tessera_operator::template::GlobalConfig;
use tessera_operator::{presets, render};
use tessera_tests::{free_port, smollm2_hf};

/// The `main` containers of a sample's main Deployment and, if it splits prefill, its prefill one.
fn rendered(sample: &str) -> (Container, Option<Container>) {
    let (pod, prefill) = rendered_with(sample, |_| {});
    (main_of(pod), prefill)
}

fn main_of(pod: PodSpec) -> Container {
    pod.containers.into_iter().find(|c| c.name == "main").unwrap()
}

/// The main Deployment's pod of a sample changed by `edit`, and the prefill `main` container.
fn rendered_with(sample: &str, edit: impl FnOnce(&mut LLMInferenceService)) -> (PodSpec, Option<Container>) {
    let path =
        format!("{}/../operator/tests/fixtures/kserve/samples/opt-125m-cpu/{sample}", env!("CARGO_MANIFEST_DIR"));
    let mut svc: LLMInferenceService = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut svc);
    svc.metadata.namespace = Some("team-a".into());
    svc.metadata.uid = Some("uid-1".into());
    let all = presets::shipped("tessera:test").unwrap();
    let configs: Vec<_> =
        config_names(&svc).iter().map(|n| all.iter().find(|p| &p.name_any() == n).cloned().unwrap()).collect();
    let spec = combine(&svc, &configs, &GlobalConfig::default()).unwrap();
    let pod = |d: k8s_openapi::api::apps::v1::Deployment| d.spec.template.spec.unwrap();
    let prefill = render::prefill_deployment(&svc, &spec).unwrap().map(|d| main_of(pod(d)));
    (pod(render::main_deployment(&svc, &spec).unwrap()), prefill)
}

/// Run a rendered `main` container locally on `port`; `env` overrides the pod's (the values
/// a cluster would fill in). Its stderr goes to `log`.
fn run_container(main: &Container, port: &str, env: &[(&str, &str)], log: &std::path::Path) -> std::process::Child {
    run_container_with(main, port, env, log, &[])
}

/// [`run_container`] with `dirs` (pod path → local path) replaced in the arguments.
fn run_container_with(
    main: &Container,
    port: &str,
    env: &[(&str, &str)],
    log: &std::path::Path,
    dirs: &[(String, String)],
) -> std::process::Child {
    let command = main.command.clone().unwrap();
    assert_eq!(command[0], "tessera", "the preset runs the tessera binary");
    let model = smollm2_hf();
    let mut argv: Vec<String> = command[1..].iter().chain(main.args.iter().flatten()).cloned().collect();
    let port_at = argv.iter().position(|a| a == "--port").unwrap() + 1;
    argv[port_at] = port.to_string();
    for a in argv.iter_mut().filter(|a| a.as_str() == render::MODEL_DIR) {
        *a = model.to_str().unwrap().to_string();
    }
    for a in argv.iter_mut() {
        for (pod_path, local) in dirs {
            *a = a.replace(pod_path.as_str(), local);
        }
    }
    argv.extend(["--host", "127.0.0.1", "--max-model-len", "512", "--kv-cache-memory", "64MiB"].map(String::from));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera-worker"));
    cmd.args(&argv).stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
    for e in main.env.iter().flatten() {
        cmd.env(&e.name, e.value.clone().unwrap_or_default());
    }
    let home = std::env::temp_dir().join(format!("render-run-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    cmd.env("HOME", &home); // the pod's HOME is an emptyDir at /home
    cmd.envs(env.iter().copied());
    cmd.spawn().expect("start the worker")
}

async fn healthy(base: &str, child: &mut std::process::Child) -> bool {
    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        if start.elapsed() > Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_worker_command_serves() {
    let (main, _) = rendered("llm-inference-service-facebook-opt-125m-cpu-no-scheduler.yaml");
    let port = free_port().to_string();
    let log = std::env::temp_dir().join(format!("render-run-{}-{port}.log", std::process::id()));
    let mut child = run_container(&main, &port, &[], &log);
    let base = format!("http://127.0.0.1:{port}");
    let up = healthy(&base, &mut child).await;
    let models: serde_json::Value = match up {
        true => reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap(),
        false => serde_json::Value::Null,
    };
    let _ = (child.kill(), child.wait());
    assert!(up, "worker never became healthy:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"facebook/opt-125m"), "{ids:?}");
    assert!(ids.contains(&"publishers/team-a/models/facebook/opt-125m"), "{ids:?}");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_prefill_and_decode_workers_split_a_request() {
    let (decode, prefill) = rendered("llm-inference-service-pd-facebook-opt-125m-cpu.yaml");
    let prefill = prefill.expect("a prefill workload");
    let trusted = decode.env.iter().flatten().find(|e| e.name == render::TRUSTED_PREFILLERS_ENV).cloned();
    assert_eq!(
        trusted.and_then(|e| e.value).as_deref(),
        Some("facebook-opt-125m-pd-kserve-prefill-workload-svc.team-a.svc.cluster.local")
    );
    let (pp, dp) = (free_port().to_string(), free_port().to_string());
    let logs = std::env::temp_dir().join(format!("render-pd-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    // What the cluster fills in: the pod IP, and for the prefill Service's DNS name a name
    // that resolves to the prefill worker here.
    let mut p = run_container(&prefill, &pp, &[("POD_IP", "127.0.0.1")], &logs.join("prefill.log"));
    let env = [("POD_IP", "127.0.0.1"), (render::TRUSTED_PREFILLERS_ENV, "localhost")];
    let mut d = run_container(&decode, &dp, &env, &logs.join("decode.log"));
    let (pb, db) = (format!("http://127.0.0.1:{pp}"), format!("http://127.0.0.1:{dp}"));
    let up = healthy(&pb, &mut p).await && healthy(&db, &mut d).await;
    let http = reqwest::Client::new();
    let mut outcome = None;
    if up {
        let body = serde_json::json!({"model": "facebook/opt-125m", "prompt": "The capital of France is",
                                      "max_tokens": 8, "temperature": 0});
        let r = http
            .post(format!("{db}/v1/completions"))
            .header("x-prefiller-host-port", format!("127.0.0.1:{pp}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let metrics = http.get(format!("{db}/metrics")).send().await.unwrap().text().await.unwrap();
        outcome = Some((status, text, metrics));
    }
    let _ = (p.kill(), d.kill(), p.wait(), d.wait());
    let log = |n: &str| std::fs::read_to_string(logs.join(n)).unwrap_or_default();
    let (status, text, metrics) = outcome
        .unwrap_or_else(|| panic!("workers never became healthy:\n{}\n{}", log("prefill.log"), log("decode.log")));
    assert_eq!(status, 200, "{text}\n{}", log("decode.log"));
    let computed = tessera_tests::metric(&metrics, "tessera:prompt_tokens_computed_total");
    assert_eq!(computed, Some(1.0), "the decode worker computed only the last prompt token");
    assert!(tessera_tests::metric(&metrics, "tessera:kv_transfer_blocks_received_total").is_some_and(|b| b > 0.0));
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lora_adapters_render_storage_and_flags_and_the_worker_serves_them() {
    use tessera_operator::api::{Criticality, LoraAdapter, LoraSpec};
    let (pod, _) = rendered_with("llm-inference-service-facebook-opt-125m-cpu-no-scheduler.yaml", |svc| {
        let adapter = |name: &str, uri: &str, criticality| LoraAdapter {
            name: Some(name.into()),
            uri: Some(uri.into()),
            criticality,
        };
        svc.spec.model.lora = Some(LoraSpec {
            adapters: Some(vec![
                adapter("sql", "hf://acme/sql-lora", None),
                adapter("chat", "pvc://adapters/chat", Some(Criticality::Sheddable)),
            ]),
        });
    });
    let inits = pod.init_containers.clone().unwrap_or_default();
    let init = inits.iter().find(|c| c.name == "storage-initializer-lora-0").expect("a download for the hf:// adapter");
    assert_eq!(init.command.as_deref(), Some(&["tessera".to_string(), "fetch".to_string()][..]));
    assert_eq!(init.args.as_deref(), Some(&["hf://acme/sql-lora".to_string(), "/mnt/lora/sql".to_string()][..]));
    assert!(inits.iter().all(|c| c.name != "storage-initializer-lora-1"), "the claim is mounted, not downloaded");
    let volumes = pod.volumes.clone().unwrap_or_default();
    let claim = volumes.iter().find(|v| v.name == "kserve-lora-1").and_then(|v| v.persistent_volume_claim.as_ref());
    assert_eq!(claim.map(|c| c.claim_name.as_str()), Some("adapters"));
    assert!(volumes.iter().any(|v| v.name == "kserve-lora" && v.empty_dir.is_some()));
    let main = main_of(pod);
    let mounts: Vec<(String, Option<String>)> = main
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path.starts_with("/mnt/lora"))
        .map(|m| (m.mount_path.clone(), m.sub_path.clone()))
        .collect();
    // Each adapter its own mount (the download by subPath of the shared emptyDir, the claim by
    // its path): none inside another read-only mount.
    assert_eq!(
        mounts,
        vec![("/mnt/lora/sql".into(), Some("sql".into())), ("/mnt/lora/chat".into(), Some("chat".into()))]
    );
    let init_mounts = init.volume_mounts.clone().unwrap_or_default();
    assert_eq!((init_mounts[0].mount_path.as_str(), init_mounts[0].read_only), ("/mnt/lora", Some(false)));
    let args = main.args.clone().unwrap_or_default();
    let at = args.iter().position(|a| a == "--lora-modules").expect("--lora-modules rendered");
    assert_eq!(args[at + 1..at + 3], ["sql=/mnt/lora/sql".to_string(), "chat=/mnt/lora/chat".to_string()]);
    assert!(args.contains(&"--enable-lora".to_string()));
    let max = args.iter().position(|a| a == "--max-loras").expect("--max-loras rendered");
    assert_eq!(args[max + 1], "2");
    let crit = main.env.iter().flatten().find(|e| e.name == render::CRITICALITY_ENV).and_then(|e| e.value.clone());
    assert_eq!(crit.as_deref(), Some("chat=Sheddable"));

    // The rendered command, with the adapters' folders pointed at two written here, serves both.
    let cfg =
        tessera_models::ModelConfig::from_hf_json(&std::fs::read_to_string(smollm2_hf().join("config.json")).unwrap())
            .unwrap();
    let root = std::env::temp_dir().join(format!("render-lora-{}", std::process::id()));
    for name in ["sql", "chat"] {
        tessera_tests::adapters::write_adapter(&root.join(name), &cfg, 0.02);
    }
    let port = free_port().to_string();
    let log = std::env::temp_dir().join(format!("render-run-{}-{port}.log", std::process::id()));
    let dirs = [("/mnt/lora".to_string(), root.display().to_string())];
    let mut child = run_container_with(&main, &port, &[], &log, &dirs);
    let base = format!("http://127.0.0.1:{port}");
    let up = healthy(&base, &mut child).await;
    let (models, completion) = match up {
        true => {
            let http = reqwest::Client::new();
            let models: serde_json::Value =
                http.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
            let body = serde_json::json!({"model": "chat", "prompt": "Hello", "max_tokens": 4});
            let r = http.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
            (models, r.status().as_u16())
        }
        false => (serde_json::Value::Null, 0),
    };
    let _ = (child.kill(), child.wait());
    assert!(up, "worker never became healthy:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"sql") && ids.contains(&"chat"), "{ids:?}");
    assert_eq!(completion, 200, "a request naming an adapter is served");
    let _ = (std::fs::remove_file(&log), std::fs::remove_dir_all(&root));
}
