//! Multi-node workloads against the real API server: LeaderWorkerSet size for data, pipeline
//! and cross-node tensor parallelism, labels, ServiceAccount, readiness from the LWS status,
//! the fixed group size, and the transitions (adding and removing `worker` / `prefill.worker`,
//! stop) deleting exactly what they created.

mod support;

use kube::api::{Patch, PatchParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use support::Env;
use tessera_operator::api::LLMInferenceService;
use tessera_operator::kinds;

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
           "metadata": {"name": name}, "spec": spec})
}

fn available(status: &str) -> Value {
    json!({"conditions": [{"type": "Available", "status": status, "reason": "Test", "message": "set by the test",
                            "lastTransitionTime": "2024-01-01T00:00:00Z"}]})
}

fn main_args(pod: &Value) -> String {
    let c = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "main").unwrap();
    c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect::<Vec<_>>().join(" ")
}

fn gpus(pod: &Value) -> Value {
    let c = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "main").unwrap();
    c["resources"]["limits"]["nvidia.com/gpu"].clone()
}

fn names(kinds_names: &[(&str, &str)], svc: &str) -> Vec<String> {
    kinds_names.iter().map(|(k, suffix)| format!("{k}/{svc}{suffix}")).collect()
}

const LWS: &str = "LeaderWorkerSet.leaderworkerset.x-k8s.io";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_group_labels_account_readiness_and_fixed_size() {
    let mut env = Env::new("mn-dp").await;
    let spec = json!({"model": {"uri": "hf://org/m"}, "worker": {}, "parallelism": {"data": 4, "dataLocal": 2}});
    env.apply::<LLMInferenceService>(service("dp", spec)).await;
    let svc = env.api::<LLMInferenceService>().get("dp").await.unwrap();
    let lws = env.object(&kinds::lws(), "dp-kserve-mn", |_| true).await;
    let t = &lws.data["spec"]["leaderWorkerTemplate"];
    assert_eq!(t["size"], 2, "data 4 / dataLocal 2");
    assert_eq!(t["restartPolicy"], "RecreateGroupOnPodRestart");
    assert_eq!(lws.owner_references()[0].uid, svc.uid().unwrap());
    assert_eq!(lws.owner_references()[0].controller, Some(true));
    let leader = &t["leaderTemplate"];
    let worker = &t["workerTemplate"];
    assert_eq!(leader["metadata"]["labels"]["app.kubernetes.io/component"], "llminferenceservice-workload-leader");
    assert_eq!(leader["metadata"]["labels"]["kserve.io/component"], "workload");
    assert_eq!(leader["metadata"]["labels"]["llm-d.ai/role"], "both");
    assert_eq!(worker["metadata"]["labels"]["app.kubernetes.io/component"], "llminferenceservice-workload-worker");
    assert!(worker["metadata"]["labels"]["kserve.io/component"].is_null(), "workers are not behind the Service");
    let (la, wa) = (main_args(&leader["spec"]), main_args(&worker["spec"]));
    assert!(la.contains("--data-parallel-start-rank $(( ${LWS_WORKER_INDEX:-0} * 2 ))"), "{la}");
    assert!(la.contains("--data-parallel-size 4 --data-parallel-size-local 2"), "{la}");
    assert!(!la.ends_with("--headless") && wa.ends_with("--headless"), "{la}\n{wa}");
    for pod in [&leader["spec"], &worker["spec"]] {
        assert_eq!(pod["serviceAccountName"], "dp-kserve-mn");
        assert!(pod["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "kserve-provision-location"));
    }
    let sa = env.object(&kinds::service_account(), "dp-kserve-mn", |_| true).await;
    assert_eq!(sa.owner_references()[0].uid, svc.uid().unwrap());
    // The workload Service selects the leaders.
    let s = env.object(&kinds::service(), "dp-kserve-workload-svc", |_| true).await;
    for (k, v) in s.data["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&leader["metadata"]["labels"][k], v, "selector {k}");
    }
    env.expect_inventory(
        "data parallel",
        &names(&[(LWS, "-kserve-mn"), ("ServiceAccount", "-kserve-mn"), ("Service", "-kserve-workload-svc")], "dp"),
    )
    .await;

    // Readiness follows the LWS's Available condition; MainWorkloadReady does not apply.
    env.condition("dp", "WorkerWorkloadReady", |c| c.reason.as_deref() == Some("LeaderWorkerSetNotAvailableYet")).await;
    env.patch_status(&kinds::lws(), "dp-kserve-mn", available("False")).await;
    env.condition("dp", "WorkerWorkloadReady", |c| c.status == "False").await;
    env.patch_status(&kinds::lws(), "dp-kserve-mn", available("True")).await;
    env.condition("dp", "Ready", |c| c.status == "True").await;
    let conds = env.api::<LLMInferenceService>().get("dp").await.unwrap().status.unwrap().conditions.unwrap();
    assert!(conds.iter().all(|c| c.type_ != "MainWorkloadReady"), "{conds:?}");
    env.assert_second_reconcile_writes_nothing().await;

    // The group size may not change: refused with a reason, the live LWS untouched.
    let p = json!({"spec": {"parallelism": {"data": 8, "dataLocal": 2}}});
    env.api::<LLMInferenceService>().patch("dp", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    let c = env.condition("dp", "Ready", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("InvalidSpec"));
    assert!(c.message.unwrap_or_default().contains("may not change (live 2, wanted 4)"));
    let lws = env.dynamic(&kinds::lws()).get("dp-kserve-mn").await.unwrap();
    assert_eq!(lws.data["spec"]["leaderWorkerTemplate"]["size"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_and_tensor_parallel_across_nodes_size_the_group() {
    let env = Env::new("mn-pp").await;
    env.apply::<LLMInferenceService>(service(
        "pp",
        json!({"model": {"uri": "hf://org/m"}, "worker": {}, "parallelism": {"pipeline": 3}}),
    ))
    .await;
    let lws = env.object(&kinds::lws(), "pp-kserve-mn", |_| true).await;
    assert_eq!(lws.data["spec"]["leaderWorkerTemplate"]["size"], 3, "a stage per CPU pod");
    let args = main_args(&lws.data["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]);
    assert!(args.contains("--pipeline-parallel-size 3"), "{args}");

    // Tensor parallelism wider than a node: 8 ranks on nodes of 4 GPUs is a group of 2 pods.
    let gpu = json!({"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "4"}}}]});
    env.apply::<LLMInferenceService>(service(
        "tp",
        json!({"model": {"uri": "hf://org/m"}, "template": gpu, "worker": gpu,
               "parallelism": {"tensor": 8, "pipeline": 1}}),
    ))
    .await;
    let lws = env.object(&kinds::lws(), "tp-kserve-mn", |_| true).await;
    let t = &lws.data["spec"]["leaderWorkerTemplate"];
    assert_eq!(t["size"], 2);
    assert_eq!(gpus(&t["leaderTemplate"]["spec"]), "4");
    assert_eq!(gpus(&t["workerTemplate"]["spec"]), "4");
    assert!(main_args(&t["leaderTemplate"]["spec"]).contains("--tensor-parallel-size 8"));

    // Prefill/decode with pipeline-parallel groups: each role's preset, its KV role and degree.
    env.apply::<LLMInferenceService>(service(
        "pdpp",
        json!({"model": {"uri": "hf://org/m"}, "worker": {}, "parallelism": {"pipeline": 2},
               "prefill": {"worker": {}, "parallelism": {"pipeline": 3}}}),
    ))
    .await;
    for (lws, role, size) in [("pdpp-kserve-mn", "kv_consumer", 2), ("pdpp-kserve-mn-prefill", "kv_producer", 3)] {
        let o = env.object(&kinds::lws(), lws, |_| true).await;
        let t = &o.data["spec"]["leaderWorkerTemplate"];
        assert_eq!(t["size"], size, "{lws}");
        for pod in ["leaderTemplate", "workerTemplate"] {
            let args = main_args(&t[pod]["spec"]);
            assert!(args.contains(role) && args.contains(&format!("--pipeline-parallel-size {size}")), "{args}");
        }
    }

    // A degree that does not split over nodes is refused, nothing created.
    env.apply::<LLMInferenceService>(service(
        "odd",
        json!({"model": {"uri": "hf://org/m"}, "template": gpu, "worker": gpu,
               "parallelism": {"tensor": 6, "pipeline": 1}}),
    ))
    .await;
    let c = env.condition("odd", "PresetsCombined", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("InvalidSpec"));
    assert!(env.dynamic(&kinds::lws()).get_opt("odd-kserve-mn").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_prefill_transitions_delete_exactly_what_they_created() {
    let env = Env::new("mn-tr").await;
    // A decoy: the user's own ServiceAccount under a name the operator would use.
    env.apply::<k8s_openapi::api::core::v1::ServiceAccount>(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "t-kserve-mn-prefill"}}))
        .await;
    let decoy = "ServiceAccount/t-kserve-mn-prefill".to_string();
    let dp = json!({"data": 2, "dataLocal": 1});
    let api = env.api::<LLMInferenceService>();
    env.apply::<LLMInferenceService>(service(
        "t",
        json!({"model": {"uri": "hf://org/m"}, "worker": {}, "parallelism": dp,
               "prefill": {"worker": {"serviceAccountName": "mine"}, "parallelism": dp,
                           "template": {"serviceAccountName": "mine"}}}),
    ))
    .await;
    let mut want = names(
        &[
            (LWS, "-kserve-mn"),
            (LWS, "-kserve-mn-prefill"),
            ("ServiceAccount", "-kserve-mn"),
            ("Service", "-kserve-workload-svc"),
            ("Service", "-kserve-prefill-workload-svc"),
        ],
        "t",
    );
    want.push(decoy.clone());
    env.expect_inventory("decode and prefill groups", &want).await;
    let pre = env.dynamic(&kinds::lws()).get("t-kserve-mn-prefill").await.unwrap();
    let t = &pre.data["spec"]["leaderWorkerTemplate"];
    assert_eq!(t["leaderTemplate"]["metadata"]["labels"]["llm-d.ai/role"], "prefill");
    // The pods' own account wins: no `-kserve-mn-prefill` account is made (the decoy stays the user's).
    assert_eq!(t["leaderTemplate"]["spec"]["serviceAccountName"], "mine");
    assert_eq!(t["workerTemplate"]["spec"]["serviceAccountName"], "mine");
    let decode = env.dynamic(&kinds::lws()).get("t-kserve-mn").await.unwrap();
    let env_of = |o: &kube::api::DynamicObject| {
        o.data["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["env"].to_string()
    };
    assert!(env_of(&decode).contains("TESSERA_TRUSTED_PREFILLERS"), "{}", env_of(&decode));
    assert!(env_of(&decode).contains("status.podIP"));
    env.patch_status(&kinds::lws(), "t-kserve-mn", available("True")).await;
    env.patch_status(&kinds::lws(), "t-kserve-mn-prefill", available("True")).await;
    env.condition("t", "PrefillWorkerWorkloadReady", |c| c.status == "True").await;
    env.condition("t", "Ready", |c| c.status == "True").await;

    // Prefill goes multi-node → single-node.
    let p = json!({"spec": {"prefill": {"worker": null, "parallelism": null}}});
    api.patch("t", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    let mut want = names(
        &[
            (LWS, "-kserve-mn"),
            ("ServiceAccount", "-kserve-mn"),
            ("Deployment.apps", "-kserve-prefill"),
            ("Service", "-kserve-workload-svc"),
            ("Service", "-kserve-prefill-workload-svc"),
        ],
        "t",
    );
    want.push(decoy.clone());
    env.expect_inventory("prefill single-node", &want).await;
    let conds = env.condition("t", "PrefillWorkloadReady", |_| true).await;
    assert_eq!(conds.reason.as_deref(), Some("DeploymentNotAvailableYet"));

    // Remove prefill and worker: back to one Deployment.
    let p = json!({"spec": {"prefill": null, "worker": null, "parallelism": null}});
    api.patch("t", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    let mut want = names(&[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc")], "t");
    want.push(decoy.clone());
    env.expect_inventory("single node", &want).await;
    let s = env.object(&kinds::service(), "t-kserve-workload-svc", |_| true).await;
    assert_eq!(s.data["spec"]["selector"]["llm-d.ai/role"], "both");

    // Back to multi-node, then stop and un-stop.
    let p = json!({"spec": {"worker": {}, "parallelism": dp}});
    api.patch("t", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    let mut multi =
        names(&[(LWS, "-kserve-mn"), ("ServiceAccount", "-kserve-mn"), ("Service", "-kserve-workload-svc")], "t");
    multi.push(decoy.clone());
    env.expect_inventory("multi-node again", &multi).await;
    let stop = |v: Value| json!({"metadata": {"annotations": {"serving.kserve.io/stop": v}}});
    api.patch("t", &PatchParams::default(), &Patch::Merge(&stop(json!("true")))).await.unwrap();
    env.expect_inventory("stopped", std::slice::from_ref(&decoy)).await;
    let c = env.condition("t", "WorkerWorkloadReady", |c| c.reason.as_deref() == Some("Stopped")).await;
    assert_eq!(c.status, "False");
    api.patch("t", &PatchParams::default(), &Patch::Merge(&stop(Value::Null))).await.unwrap();
    env.expect_inventory("un-stopped", &multi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_deletes_the_workloads_even_when_the_spec_no_longer_renders() {
    let env = Env::new("stop-bad").await;
    let api = env.api::<LLMInferenceService>();
    env.apply::<LLMInferenceService>(service("b", json!({"model": {"uri": "hf://org/m"}}))).await;
    env.expect_inventory(
        "running",
        &names(&[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc")], "b"),
    )
    .await;
    // A baseRef that does not exist, and the stop annotation, in one change.
    let p = json!({"metadata": {"annotations": {"serving.kserve.io/stop": "true"}},
                   "spec": {"baseRefs": [{"name": "missing-config"}]}});
    api.patch("b", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    env.expect_inventory("stopped with a broken spec", &[]).await;
    let c = env.condition("b", "PresetsCombined", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("ConfigNotFound"));
}
