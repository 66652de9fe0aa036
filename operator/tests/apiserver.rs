//! The operator against a real kube-apiserver (see `support`): the opt-125m sample applied
//! with kubectl, baseRefs, missing configs, readiness, stop, invalid specs, idempotence.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use support::{eventually, Env};
use tessera_operator::api::LLMInferenceService;

const WAIT: Duration = Duration::from_secs(30);

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
           "metadata": {"name": name}, "spec": spec})
}

fn config(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceServiceConfig",
           "metadata": {"name": name}, "spec": spec})
}

async fn deployment(env: &Env, name: &str, pred: impl Fn(&Deployment) -> bool) -> Deployment {
    let api = env.api::<Deployment>();
    eventually(&format!("Deployment {name}"), WAIT, || async {
        api.get_opt(name).await.ok().flatten().filter(|d| pred(d))
    })
    .await
}

/// The Service is applied right after the Deployment: wait for it too.
async fn workload_service(env: &Env, name: &str) -> Service {
    let api = env.api::<Service>();
    eventually(&format!("Service {name}"), WAIT, || async { api.get_opt(name).await.ok().flatten() }).await
}

fn main_container(d: &Deployment) -> k8s_openapi::api::core::v1::Container {
    d.spec.template.spec.as_ref().unwrap().containers.iter().find(|c| c.name == "main").unwrap().clone()
}

async fn mark_available(env: &Env, name: &str) {
    let patch = json!({"status": {"conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}});
    env.api::<Deployment>().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

fn kubectl(env: &Env, args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", support::kubeconfig())
        .args(["-n", &env.ns])
        .args(args)
        .output()
        .expect("run kubectl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubectl {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_sample_applied_with_kubectl() {
    let env = Env::new("opt").await;
    let sample = support::fixtures()
        .join("kserve/samples/opt-125m-cpu/llm-inference-service-facebook-opt-125m-cpu-no-scheduler.yaml");
    kubectl(&env, &["apply", "-f", sample.to_str().unwrap()]);
    let name = "facebook-opt-125m-single";
    let svc = env.api::<LLMInferenceService>().get(name).await.unwrap();

    let d = deployment(&env, &format!("{name}-kserve"), |_| true).await;
    let labels = d.labels();
    for (k, v) in [
        ("app.kubernetes.io/name", name),
        ("app.kubernetes.io/part-of", "llminferenceservice"),
        ("app.kubernetes.io/component", "llminferenceservice-workload"),
        ("kserve.io/component", "workload"),
        ("llm-d.ai/role", "both"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("LLMInferenceService", svc.uid().unwrap().as_str(), Some(true))
    );
    assert_eq!(d.spec.replicas, Some(1));
    let main = main_container(&d);
    assert_eq!(main.image.as_deref(), Some("quay.io/pierdipi/vllm-cpu:latest"));
    assert_eq!(main.command.clone().unwrap(), ["tessera", "serve", "/mnt/models"]);
    let ns = env.ns.as_str();
    let alias = format!("publishers/{ns}/models/facebook/opt-125m");
    assert_eq!(
        main.args.clone().unwrap(),
        ["--served-model-name", "facebook/opt-125m", alias.as_str(), "--port", "8000"]
    );
    assert_eq!(main.ports.clone().unwrap()[0].container_port, 8000);
    assert_eq!(main.readiness_probe.clone().unwrap().http_get.unwrap().path.as_deref(), Some("/health"));
    let pod = d.spec.template.spec.clone().unwrap();
    let init = pod.init_containers.clone().unwrap();
    assert_eq!(init[0].name, "storage-initializer");
    assert_eq!(init[0].image, main.image);
    assert_eq!(init[0].args.clone().unwrap(), ["hf://facebook/opt-125m", "/mnt/models"]);
    assert!(pod.volumes.unwrap().iter().any(|v| v.name == "kserve-provision-location" && v.empty_dir.is_some()));

    let s = workload_service(&env, &format!("{name}-kserve-workload-svc")).await;
    let spec = s.spec.clone().unwrap();
    assert_eq!(spec.selector.unwrap().get("app.kubernetes.io/name").map(String::as_str), Some(name));
    assert_eq!(spec.ports.unwrap()[0].port, 8000);
    assert_eq!(s.owner_references()[0].uid, svc.uid().unwrap());

    // `router.route: {}` with the default Gateway, which does not exist here.
    let gw = env.condition(name, "GatewaysReady", |c| c.status == "False").await;
    assert_eq!(gw.reason.as_deref(), Some("RefsInvalid"));
    assert!(env.condition(name, "PresetsCombined", |_| true).await.status == "True");
    mark_available(&env, &format!("{name}-kserve")).await;
    env.condition(name, "MainWorkloadReady", |c| c.status == "True").await;
    let ready = env.condition(name, "Ready", |c| c.status != "True").await;
    assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("False", Some("RefsInvalid")));
    let svc = env.api::<LLMInferenceService>().get(name).await.unwrap();
    assert_eq!(svc.status.unwrap().url, None, "routed through a Gateway that has no address yet");

    let table = kubectl(&env, &["get", "llmisvc"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "URL", "READY", "REASON", "AGE"], "{table}");
    assert!(table.contains("RefsInvalid"), "{table}");
    let wide = kubectl(&env, &["get", "llmisvc", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("URLS"), "{wide}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_refs_order_and_config_changes() {
    let env = Env::new("baserefs").await;
    env.apply::<tessera_operator::api::LLMInferenceServiceConfig>(config(
        "one",
        json!({
        "model": {"uri": "hf://org/from-config", "name": "from-config"}, "replicas": 2,
        "template": {"containers": [{"name": "main", "image": "one", "env": [{"name": "X", "value": "1"}]}]}}),
    ))
    .await;
    env.apply::<tessera_operator::api::LLMInferenceServiceConfig>(config(
        "two",
        json!({
        "template": {"containers": [{"name": "main", "image": "two"}]}}),
    ))
    .await;

    // Only baseRefs: the model and the pod come from the config.
    env.apply::<LLMInferenceService>(service("only-refs", json!({"baseRefs": [{"name": "one"}]}))).await;
    let d = deployment(&env, "only-refs-kserve", |_| true).await;
    assert_eq!(main_container(&d).image.as_deref(), Some("one"));
    assert_eq!(d.spec.replicas, Some(2));
    assert!(main_container(&d).args.unwrap().contains(&"from-config".to_string()));
    assert_eq!(
        d.spec.template.spec.unwrap().init_containers.unwrap()[0].args.clone().unwrap()[0],
        "hf://org/from-config"
    );

    // Later baseRef wins; the service's own spec wins over both.
    env.apply::<LLMInferenceService>(service(
        "layered",
        json!({
        "model": {"uri": "hf://org/m"}, "baseRefs": [{"name": "one"}, {"name": "two"}], "replicas": 3,
        "template": {"containers": [{"name": "main", "env": [{"name": "Y", "value": "2"}]}]}}),
    ))
    .await;
    let d = deployment(&env, "layered-kserve", |_| true).await;
    let main = main_container(&d);
    assert_eq!(main.image.as_deref(), Some("two"));
    assert_eq!(d.spec.replicas, Some(3));
    let env_names: Vec<String> = main.env.unwrap().into_iter().map(|e| e.name).collect();
    assert!(env_names.contains(&"X".into()) && env_names.contains(&"Y".into()), "{env_names:?}");

    // A config change re-renders its users.
    env.apply::<tessera_operator::api::LLMInferenceServiceConfig>(config(
        "two",
        json!({
        "template": {"containers": [{"name": "main", "image": "two-v2"}]}}),
    ))
    .await;
    deployment(&env, "layered-kserve", |d| main_container(d).image.as_deref() == Some("two-v2")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_config_then_recovery() {
    let env = Env::new("missing").await;
    env.apply::<LLMInferenceService>(service(
        "m",
        json!({"model": {"uri": "hf://a/b"}, "baseRefs": [{"name": "later"}]}),
    ))
    .await;
    let c = env.condition("m", "PresetsCombined", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("ConfigNotFound"));
    assert!(c.message.unwrap().contains("\"later\""));
    let ready = env.condition("m", "Ready", |_| true).await;
    assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("False", Some("ConfigNotFound")));
    assert!(env.api::<Deployment>().get_opt("m-kserve").await.unwrap().is_none());

    env.apply::<tessera_operator::api::LLMInferenceServiceConfig>(config("later", json!({"replicas": 4}))).await;
    let d = deployment(&env, "m-kserve", |_| true).await;
    assert_eq!(d.spec.replicas, Some(4));
    env.condition("m", "PresetsCombined", |c| c.status == "True").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn available_deployment_makes_ready_and_a_second_reconcile_writes_nothing() {
    let mut env = Env::new("ready").await;
    env.apply::<LLMInferenceService>(service("r", json!({"model": {"uri": "pvc://models/smol"}}))).await;
    let d = deployment(&env, "r-kserve", |_| true).await;
    let ours = d
        .metadata
        .managed_fields
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("tessera-operator"));
    let owned = serde_json::to_string(&ours.unwrap().fields_v1).unwrap();
    assert!(!owned.contains("f:replicas"), "replicas left nil must not be owned by the operator: {owned}");
    let pod = d.spec.template.spec.unwrap();
    let vol = pod.volumes.unwrap().into_iter().find(|v| v.name == "kserve-provision-location").unwrap();
    assert_eq!(vol.persistent_volume_claim.unwrap().claim_name, "models");
    let mount =
        pod.containers[0].volume_mounts.clone().unwrap().into_iter().find(|m| m.mount_path == "/mnt/models").unwrap();
    assert_eq!(mount.sub_path.as_deref(), Some("smol"));
    assert!(pod.init_containers.is_none());
    env.condition("r", "Ready", |c| c.status != "True").await;

    mark_available(&env, "r-kserve").await;
    let ready = env.condition("r", "Ready", |c| c.status == "True").await;
    assert!(ready.last_transition_time.is_some());
    for ty in ["PresetsCombined", "MainWorkloadReady", "WorkloadsReady", "RouterReady"] {
        assert_eq!(env.condition("r", ty, |_| true).await.status, "True", "{ty}");
    }
    let svc = env.api::<LLMInferenceService>().get("r").await.unwrap();
    assert_eq!(svc.status.as_ref().unwrap().observed_generation, svc.metadata.generation);
    assert!(svc.status.as_ref().unwrap().conditions.as_ref().unwrap().iter().all(|c| c.type_ != "HTTPRoutesReady"));

    // An autoscaler's count survives a re-render.
    let scale = json!({"spec": {"replicas": 3}});
    env.api::<Deployment>().patch("r-kserve", &PatchParams::default(), &Patch::Merge(&scale)).await.unwrap();
    let env_patch =
        json!({"spec": {"template": {"containers": [{"name": "main", "env": [{"name": "Z", "value": "1"}]}]}}});
    env.api::<LLMInferenceService>().patch("r", &PatchParams::default(), &Patch::Merge(&env_patch)).await.unwrap();
    let d =
        deployment(&env, "r-kserve", |d| main_container(d).env.unwrap_or_default().iter().any(|e| e.name == "Z")).await;
    assert_eq!(d.spec.replicas, Some(3));
    mark_available(&env, "r-kserve").await;
    env.condition("r", "Ready", |c| c.status == "True").await;

    // Idempotence: a fresh operator reconciles everything again and writes nothing.
    let versions = |env: &Env| {
        let env_client = (env.api::<LLMInferenceService>(), env.api::<Deployment>(), env.api::<Service>());
        async move {
            (
                env_client.0.get("r").await.unwrap().resource_version(),
                env_client.1.get("r-kserve").await.unwrap().resource_version(),
                env_client.2.get("r-kserve-workload-svc").await.unwrap().resource_version(),
            )
        }
    };
    // Let the first operator finish its own writes (a status update may still be in flight).
    let before = eventually("the objects settle", WAIT, || async {
        let a = versions(&env).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        (versions(&env).await == a).then_some(a)
    })
    .await;
    env.restart_controller().await;
    eventually("a reconcile by the new operator", WAIT, || async { (env.reconciles() >= 1).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(versions(&env).await, before, "the second reconcile wrote something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_unstop() {
    let env = Env::new("stop").await;
    env.apply::<LLMInferenceService>(service("s", json!({"model": {"uri": "hf://a/b"}}))).await;
    deployment(&env, "s-kserve", |_| true).await;
    let svcs_api = env.api::<LLMInferenceService>();
    let patch = |v: Value| {
        let api = svcs_api.clone();
        async move {
            let p = json!({"metadata": {"annotations": {"serving.kserve.io/stop": v}}});
            api.patch("s", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
        }
    };
    patch(json!("true")).await;
    let (deps, svcs) = (env.api::<Deployment>(), env.api::<Service>());
    eventually("workloads deleted", WAIT, || async {
        let gone = deps.get_opt("s-kserve").await.ok()?.is_none()
            && svcs.get_opt("s-kserve-workload-svc").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    let ready = env.condition("s", "Ready", |c| c.status == "False").await;
    assert_eq!(ready.reason.as_deref(), Some("Stopped"));
    let svc = env.api::<LLMInferenceService>().get("s").await.unwrap();
    assert!(svc.status.unwrap().url.is_none());

    patch(Value::Null).await;
    deployment(&env, "s-kserve", |_| true).await;
    workload_service(&env, "s-kserve-workload-svc").await;
    env.condition("s", "MainWorkloadReady", |c| c.reason.as_deref() != Some("Stopped")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_create_nothing() {
    let env = Env::new("invalid").await;
    env.apply::<LLMInferenceService>(service("w", json!({"model": {"uri": "hf://a/b"}, "worker": {}}))).await;
    let c = env.condition("w", "PresetsCombined", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("InvalidSpec"));
    assert!(c.message.unwrap().contains("worker"));
    env.apply::<LLMInferenceService>(service(
        "l",
        json!({"model": {"uri": "hf://a/b", "name": "m",
        "lora": {"adapters": [{"name": "x", "uri": "hf://x"}, {"name": "x", "uri": "hf://y"}]}}}),
    ))
    .await;
    let c = env.condition("l", "PresetsCombined", |c| c.status == "False").await;
    assert!(c.message.unwrap().contains("\"x\""));
    env.apply::<LLMInferenceService>(service("u", json!({"model": {"uri": "ftp://a/b"}}))).await;
    let c = env.condition("u", "Ready", |c| c.status == "False").await;
    assert!(c.message.unwrap().contains("ftp"));
    // The API server itself refuses what the schema forbids.
    let bad = env
        .api::<LLMInferenceService>()
        .patch(
            "p",
            &PatchParams::apply("t"),
            &Patch::Apply(&service("p", json!({"model": {"uri": "hf://a"}, "parallelism": {"tensor": 0}}))),
        )
        .await;
    assert!(bad.is_err());
    for name in ["w-kserve", "l-kserve", "u-kserve"] {
        assert!(env.api::<Deployment>().get_opt(name).await.unwrap().is_none(), "{name} was created");
    }
}

fn env_value(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_decode_objects_labels_readiness_and_removal() {
    let env = Env::new("pd").await;
    let sample =
        support::fixtures().join("kserve/samples/opt-125m-cpu/llm-inference-service-pd-facebook-opt-125m-cpu.yaml");
    kubectl(&env, &["apply", "-f", sample.to_str().unwrap()]);
    let name = "facebook-opt-125m-pd";
    let ns = env.ns.clone();
    let decode = deployment(&env, &format!("{name}-kserve"), |_| true).await;
    let prefill = deployment(&env, &format!("{name}-kserve-prefill"), |_| true).await;
    let role = |d: &Deployment| d.labels().get("llm-d.ai/role").cloned();
    assert_eq!(role(&decode).as_deref(), Some("decode"));
    assert_eq!(role(&prefill).as_deref(), Some("prefill"));
    assert_eq!(
        prefill.labels().get("app.kubernetes.io/component").map(String::as_str),
        Some("llminferenceservice-workload-prefill")
    );
    let (d_main, p_main) = (main_container(&decode), main_container(&prefill));
    let kv = |c: &k8s_openapi::api::core::v1::Container| {
        let args = c.args.clone().unwrap_or_default();
        let at = args.iter().position(|a| a == "--kv-transfer-config").expect("--kv-transfer-config");
        serde_json::from_str::<Value>(&args[at + 1]).unwrap()["kv_role"].clone()
    };
    assert_eq!((kv(&d_main), kv(&p_main)), (json!("kv_consumer"), json!("kv_producer")));
    // The decode workers' built-in proxy trusts this service's prefill pods, and nothing else.
    let trusted = format!("{name}-kserve-prefill-workload-svc.{ns}.svc.cluster.local");
    assert_eq!(env_value(&d_main, "TESSERA_TRUSTED_PREFILLERS").as_deref(), Some(trusted.as_str()));
    assert_eq!(env_value(&p_main, "TESSERA_TRUSTED_PREFILLERS"), None);
    for c in [&d_main, &p_main] {
        let ip = c.env.iter().flatten().find(|e| e.name == "POD_IP").expect("POD_IP");
        let field = ip.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
        assert_eq!(field, Some("status.podIP"));
    }
    // The prefill pods get the model too.
    let p_init = prefill.spec.template.spec.as_ref().unwrap().init_containers.clone().unwrap();
    assert_eq!(p_init[0].args.clone().unwrap(), ["hf://facebook/opt-125m", "/mnt/models"]);
    let headless = workload_service(&env, &format!("{name}-kserve-prefill-workload-svc")).await;
    let spec = headless.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.selector.unwrap().get("llm-d.ai/role").map(String::as_str), Some("prefill"));
    let main_svc = workload_service(&env, &format!("{name}-kserve-workload-svc")).await;
    assert_eq!(main_svc.spec.unwrap().selector.unwrap().get("llm-d.ai/role").map(String::as_str), Some("decode"));

    // Readiness follows both Deployments.
    env.condition(name, "PrefillWorkloadReady", |c| c.status == "Unknown").await;
    mark_available(&env, &format!("{name}-kserve")).await;
    env.condition(name, "MainWorkloadReady", |c| c.status == "True").await;
    let w = env.condition(name, "WorkloadsReady", |c| c.status != "True").await;
    assert!(w.message.unwrap_or_default().contains("PrefillWorkloadReady"));
    mark_available(&env, &format!("{name}-kserve-prefill")).await;
    env.condition(name, "WorkloadsReady", |c| c.status == "True").await;

    // Stop deletes all four objects; un-stop brings them back.
    let api = env.api::<LLMInferenceService>();
    let stop = |v: Value| json!({"metadata": {"annotations": {"serving.kserve.io/stop": v}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&stop(json!("true")))).await.unwrap();
    let (deps, svcs) = (env.api::<Deployment>(), env.api::<Service>());
    let children = [
        format!("{name}-kserve"),
        format!("{name}-kserve-prefill"),
        format!("{name}-kserve-workload-svc"),
        format!("{name}-kserve-prefill-workload-svc"),
    ];
    eventually("every workload deleted", WAIT, || async {
        for (i, n) in children.iter().enumerate() {
            let there =
                if i < 2 { deps.get_opt(n).await.ok()?.is_some() } else { svcs.get_opt(n).await.ok()?.is_some() };
            if there {
                return None;
            }
        }
        Some(())
    })
    .await;
    let c = env.condition(name, "PrefillWorkloadReady", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("Stopped"));
    api.patch(name, &PatchParams::default(), &Patch::Merge(&stop(Value::Null))).await.unwrap();
    deployment(&env, &format!("{name}-kserve-prefill"), |_| true).await;
    workload_service(&env, &format!("{name}-kserve-prefill-workload-svc")).await;

    // Removing `prefill` deletes what it created; the main workload serves whole requests again.
    let patch = json!({"spec": {"prefill": null}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("prefill objects deleted", WAIT, || async {
        let gone = deps.get_opt(&format!("{name}-kserve-prefill")).await.ok()?.is_none()
            && svcs.get_opt(&format!("{name}-kserve-prefill-workload-svc")).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    let both = deployment(&env, &format!("{name}-kserve"), |d| role(d).as_deref() == Some("both")).await;
    assert_eq!(env_value(&main_container(&both), "TESSERA_TRUSTED_PREFILLERS"), None);
    eventually("PrefillWorkloadReady removed", WAIT, || async {
        let s = env.api::<LLMInferenceService>().get(name).await.ok()?;
        let conds = s.status?.conditions?;
        (!conds.iter().any(|c| c.type_ == "PrefillWorkloadReady")).then_some(())
    })
    .await;
}
