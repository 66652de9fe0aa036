//! Presets + baseRefs + the service's spec, merged and rendered: KServe's stock presets over
//! every KServe sample, and ours over the opt-125m sample, down to the Deployment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kube::ResourceExt;
use serde_json::{json, Value};
use tessera_operator::api::{LLMInferenceService, LLMInferenceServiceConfig};
use tessera_operator::combine::{combine, config_names};
use tessera_operator::template::GlobalConfig;
use tessera_operator::{presets, render};

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kserve")
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kserve_presets() -> HashMap<String, LLMInferenceServiceConfig> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(reference().join("presets")).unwrap() {
        for d in docs(&e.unwrap().path()) {
            let c: LLMInferenceServiceConfig = serde_json::from_value(d).unwrap();
            out.insert(c.name_any(), c);
        }
    }
    assert_eq!(out.len(), 8, "KServe ships 8 presets");
    out
}

fn samples() -> Vec<(PathBuf, LLMInferenceService)> {
    let mut out = vec![];
    for dir in std::fs::read_dir(reference().join("samples")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            for d in docs(&path).into_iter().filter(|d| d["kind"] == "LLMInferenceService") {
                let mut svc: LLMInferenceService = serde_json::from_value(d).unwrap();
                svc.metadata.namespace = Some("team-a".into());
                out.push((path.clone(), svc));
            }
        }
    }
    assert!(out.len() >= 10, "found {} samples", out.len());
    out
}

fn lookup(
    svc: &LLMInferenceService,
    set: &HashMap<String, LLMInferenceServiceConfig>,
) -> Vec<LLMInferenceServiceConfig> {
    config_names(svc)
        .iter()
        .map(|n| set.get(n).cloned().unwrap_or_else(|| panic!("{}: no config {n}", svc.name_any())))
        .collect()
}

fn no_templates_left(v: &Value, at: &str) {
    match v {
        Value::String(s) => assert!(!s.contains("{{"), "{at}: unrendered {s:?}"),
        Value::Array(a) => a.iter().for_each(|x| no_templates_left(x, at)),
        Value::Object(o) => o.values().for_each(|x| no_templates_left(x, at)),
        _ => {}
    }
}

#[test]
fn kserve_stock_presets_merge_and_render_over_every_sample() {
    let stock = kserve_presets();
    // Upstream references the pipeline-parallel preset but never ships it: use ours.
    let mut set = stock.clone();
    for p in presets::shipped("img").unwrap() {
        set.entry(p.name_any()).or_insert(p);
    }
    for (path, svc) in samples() {
        let spec = combine(&svc, &lookup(&svc, &set), &GlobalConfig::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v = serde_json::to_value(&spec).unwrap();
        no_templates_left(&v, &path.display().to_string());
        let main = spec.workload.template.as_ref().unwrap().containers.iter().find(|c| c.name == "main").unwrap();
        let cmdline =
            [main.command.clone().unwrap_or_default(), main.args.clone().unwrap_or_default()].concat().join(" ");
        let model = spec.model.name.clone().unwrap();
        assert!(cmdline.contains("vllm serve") && cmdline.contains(&model), "{}: {cmdline}", path.display());
        if spec.workload.worker.is_some() || spec.prefill.as_ref().is_some_and(|p| p.worker.is_some()) {
            continue;
        }
        let d = render::main_deployment(&svc, &spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if spec.prefill.is_some() {
            // KServe's stock decode preset keeps its llm-d routing sidecar; the prefill pods render too.
            let pod = d.spec.template.spec.unwrap();
            let inits: Vec<String> = pod.init_containers.unwrap_or_default().into_iter().map(|c| c.name).collect();
            assert!(inits.contains(&"llm-d-routing-sidecar".to_string()), "{}: {inits:?}", path.display());
            let p = render::prefill_deployment(&svc, &spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(p.is_some(), "{}", path.display());
        }
    }
}

#[test]
fn kserve_dp_preset_renders_parallelism_flags() {
    let stock = kserve_presets();
    let svc: LLMInferenceService = serde_json::from_value(json!({
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
        "metadata": {"name": "ds", "namespace": "n"},
        "spec": {"model": {"uri": "pvc://c/m", "name": "deepseek"}, "worker": {},
                 "parallelism": {"data": 16, "dataLocal": 8, "expert": true, "tensor": 1}},
    }))
    .unwrap();
    let spec = combine(&svc, &lookup(&svc, &stock), &GlobalConfig::default()).unwrap();
    let leader = spec.workload.template.unwrap().containers[0].args.clone().unwrap().join(" ");
    assert!(leader.contains("--data-parallel-size 16"), "{leader}");
    assert!(leader.contains("--data-parallel-size-local 8") && leader.contains("--data-parallel-rpc-port 5555"));
    assert!(leader.contains("--enable-expert-parallel") && leader.contains("--tensor-parallel-size 1"));
    assert!(leader.contains("START_RANK=0") && leader.contains("--served-model-name \"deepseek\""));
    let worker = spec.workload.worker.unwrap().containers[0].args.clone().unwrap().join(" ");
    assert!(worker.contains("START_RANK=$(( ${LWS_WORKER_INDEX:-0} * 8 ))") && worker.contains("--headless"));
}

fn opt_sample() -> LLMInferenceService {
    samples()
        .into_iter()
        .find(|(p, _)| p.ends_with("llm-inference-service-facebook-opt-125m-cpu-no-scheduler.yaml"))
        .map(|(_, s)| s)
        .unwrap()
}

#[test]
fn our_presets_over_the_opt_sample_give_a_tessera_deployment() {
    let ours: HashMap<_, _> =
        presets::shipped("tessera:test").unwrap().into_iter().map(|p| (p.name_any(), p)).collect();
    let svc = opt_sample();
    assert_eq!(config_names(&svc), ["kserve-config-llm-router-route", "kserve-config-llm-template"]);
    let spec = combine(&svc, &lookup(&svc, &ours), &GlobalConfig::default()).unwrap();
    let d = render::main_deployment(&svc, &spec).unwrap();
    let pod = d.spec.template.spec.unwrap();
    let main = &pod.containers[0];
    assert_eq!(main.name, "main");
    assert_eq!(main.image.as_deref(), Some("quay.io/pierdipi/vllm-cpu:latest"), "the sample's image is kept");
    assert_eq!(main.command.clone().unwrap(), ["tessera", "serve", "/mnt/models"]);
    assert_eq!(
        main.args.clone().unwrap(),
        ["--served-model-name", "facebook/opt-125m", "publishers/team-a/models/facebook/opt-125m", "--port", "8000"]
    );
    let env: Vec<_> = main.env.clone().unwrap().into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect();
    assert!(
        env.contains(&("VLLM_LOGGING_LEVEL".into(), "DEBUG".into())) && env.contains(&("HOME".into(), "/home".into()))
    );
    let live = main.liveness_probe.clone().unwrap();
    assert_eq!(live.initial_delay_seconds, Some(30), "the sample's probe timing wins");
    assert_eq!(live.http_get.unwrap().path.as_deref(), Some("/health"), "the preset's probe target is kept");
    assert_eq!(main.security_context.clone().unwrap().run_as_non_root, Some(false));
    let init = &pod.init_containers.clone().unwrap()[0];
    assert_eq!(init.command.clone().unwrap(), ["tessera", "fetch"]);
    assert_eq!(init.args.clone().unwrap(), ["hf://facebook/opt-125m", "/mnt/models"]);
    let vol = pod.volumes.clone().unwrap().into_iter().find(|v| v.name == "kserve-provision-location").unwrap();
    assert!(vol.empty_dir.is_some());
    let mount = main.volume_mounts.clone().unwrap().into_iter().find(|m| m.mount_path == "/mnt/models").unwrap();
    assert_eq!((mount.name.as_str(), mount.read_only), ("kserve-provision-location", Some(true)));
}

fn config(name: &str, spec: Value) -> LLMInferenceServiceConfig {
    serde_json::from_value(json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceServiceConfig",
                                  "metadata": {"name": name}, "spec": spec}))
    .unwrap()
}

#[test]
fn base_refs_merge_in_order_and_the_service_wins() {
    let svc: LLMInferenceService = serde_json::from_value(json!({
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
        "metadata": {"name": "s", "namespace": "n"},
        "spec": {"model": {"uri": "hf://a/b"}, "baseRefs": [{"name": "one"}, {"name": "two"}], "replicas": 5},
    }))
    .unwrap();
    assert_eq!(config_names(&svc), ["kserve-config-llm-template", "one", "two"]);
    let base = presets::shipped("img").unwrap().into_iter().find(|p| p.name_any() == presets::TEMPLATE).unwrap();
    let one = config(
        "one",
        json!({"replicas": 2, "template": {"containers": [{"name": "main", "image": "one", "env": [{"name": "X", "value": "1"}]}]}}),
    );
    let two = config(
        "two",
        json!({"template": {"containers": [{"name": "main", "image": "{{ .ObjectMeta.Name }}-two"}]}, "model": {"uri": "hf://a/b", "name": "shared"}}),
    );
    let spec = combine(&svc, &[base.clone(), one.clone(), two], &GlobalConfig::default()).unwrap();
    let main = &spec.workload.template.unwrap().containers[0];
    assert_eq!(main.image.as_deref(), Some("s-two"), "a later baseRef wins, its templates rendered");
    assert!(main.env.clone().unwrap().iter().any(|e| e.name == "X"), "earlier baseRefs still contribute");
    assert_eq!(spec.workload.replicas, Some(5), "the service's spec wins");
    assert_eq!(spec.model.name.as_deref(), Some("shared"));
    assert!(main.args.clone().unwrap().contains(&"shared".to_string()), "the preset sees the merged model name");
    // A config without a model leaves the service's model alone.
    let spec = combine(&svc, &[base, one.clone(), one], &GlobalConfig::default()).unwrap();
    assert_eq!((spec.model.uri.as_str(), spec.model.name.as_deref()), ("hf://a/b", Some("s")));
}

#[test]
fn invalid_specs_are_refused_with_a_reason() {
    let base = presets::shipped("img").unwrap().into_iter().find(|p| p.name_any() == presets::TEMPLATE).unwrap();
    let case = |spec: Value, configs: Vec<LLMInferenceServiceConfig>| {
        let svc: LLMInferenceService = serde_json::from_value(json!({
            "apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
            "metadata": {"name": "s", "namespace": "n"}, "spec": spec}))
        .unwrap();
        let e = combine(&svc, &configs, &GlobalConfig::default()).unwrap_err();
        (e.reason().to_string(), e.to_string())
    };
    let (r, m) = case(json!({"model": {"uri": "hf://a"}, "worker": {}}), vec![]);
    assert_eq!(r, "InvalidSpec");
    assert!(m.contains("worker") && m.contains("pipeline"), "{m}");
    let (_, m) = case(json!({"model": {"uri": "hf://a"}, "parallelism": {"data": 2}}), vec![base.clone()]);
    assert!(m.contains("dataLocal"), "{m}");
    let (_, m) = case(
        json!({"model": {"uri": "hf://a", "name": "m", "lora": {"adapters": [{"name": "m"}]}}}),
        vec![base.clone()],
    );
    assert!(m.contains("\"m\"") && m.contains("model's own name"), "{m}");
    let (_, m) = case(
        json!({"model": {"uri": "hf://a", "lora": {"adapters": [{"name": "x"}, {"name": "x"}]}}}),
        vec![base.clone()],
    );
    assert!(m.contains("two adapters"), "{m}");
    let (_, m) = case(json!({"model": {"uri": "hf://a", "lora": {"adapters": [{"name": "x"}]}}}), vec![base.clone()]);
    assert!(m.contains("adapters[0]") && m.contains("no uri"), "{m}");
    let (_, m) = case(
        json!({"model": {"uri": "hf://a", "lora": {"adapters": [{"name": "../x", "uri": "hf://l"}]}}}),
        vec![base.clone()],
    );
    assert!(m.contains("\"../x\"") && m.contains("'/'"), "{m}");
    let nested = config("bad", json!({"baseRefs": [{"name": "other"}]}));
    let (_, m) = case(json!({"model": {"uri": "hf://a"}}), vec![nested]);
    assert!(m.contains("\"bad\"") && m.contains("baseRefs"), "{m}");
    let tmpl = config("tmpl", json!({"template": {"containers": [{"name": "main", "image": "{{ .Spec.Nope }}"}]}}));
    let (r, m) = case(json!({"model": {"uri": "hf://a"}}), vec![tmpl]);
    assert_eq!(r, "TemplateError");
    assert!(m.contains(".Spec.Nope"), "{m}");
}

#[test]
fn single_node_parallelism_reaches_the_worker_with_our_and_kserves_presets() {
    let ours: HashMap<_, _> =
        presets::shipped("tessera:test").unwrap().into_iter().map(|p| (p.name_any(), p)).collect();
    for set in [ours, kserve_presets()] {
        let svc: LLMInferenceService = serde_json::from_value(json!({
            "apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
            "metadata": {"name": "tp", "namespace": "n", "uid": "u"},
            "spec": {"model": {"uri": "pvc://c/m", "name": "m"}, "parallelism": {"tensor": 2, "expert": true},
                     "template": {"containers": [{"name": "main",
                                  "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}}]}},
        }))
        .unwrap();
        let spec = combine(&svc, &lookup(&svc, &set), &GlobalConfig::default()).unwrap();
        let d = render::main_deployment(&svc, &spec).unwrap();
        let main = d.spec.template.spec.unwrap().containers.into_iter().find(|c| c.name == "main").unwrap();
        let args = main.args.clone().unwrap().join(" ");
        assert!(args.contains("--tensor-parallel-size 2") && args.contains("--enable-expert-parallel"), "{args}");
        let res = main.resources.unwrap();
        for list in [res.limits.unwrap(), res.requests.unwrap()] {
            assert_eq!(list.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("2"), "one GPU per rank");
        }
    }
}
