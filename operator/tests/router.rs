//! The router against the real API server: the managed HTTPRoute (rules, backends with and
//! without a scheduler, gateway refs as parents), the InferencePools and endpoint picker,
//! `pool.ref`, route refs, readiness from Gateway / route / pool status with the URL from the
//! Gateway, `RefsInvalid`, and the transitions (scheduler removed, managed → refs, stop).

mod support;

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::{json, Value};
use support::Env;
use tessera_operator::api::LLMInferenceService;
use tessera_operator::kinds;

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
           "metadata": {"name": name}, "spec": spec})
}

fn cond(ty: &str) -> Value {
    json!({"type": ty, "status": "True", "reason": ty, "message": "set by the test", "lastTransitionTime": "2024-01-01T00:00:00Z"})
}

async fn gateway(env: &Env, name: &str, address: Option<&str>) {
    let gw = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": name},
        "spec": {"gatewayClassName": "test", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}});
    env.dynamic(&kinds::gateway())
        .patch(name, &PatchParams::apply("tessera-tests").force(), &Patch::Apply(&gw))
        .await
        .unwrap();
    if let Some(a) = address {
        let status = json!({"conditions": [cond("Programmed"), cond("Accepted")],
                            "addresses": [{"type": "IPAddress", "value": a}]});
        env.patch_status(&kinds::gateway(), name, status).await;
    }
}

/// The route's parents report it Accepted with resolved refs, as a Gateway controller would.
async fn accept_route(env: &Env, route: &str) {
    let r = env.object(&kinds::http_route(), route, |_| true).await;
    let parents: Vec<Value> = r.data["spec"]["parentRefs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            json!({"parentRef": p, "controllerName": "example.com/gateway",
                        "conditions": [cond("Accepted"), cond("ResolvedRefs")]})
        })
        .collect();
    env.patch_status(&kinds::http_route(), route, json!({ "parents": parents })).await;
}

async fn mark_available(env: &Env, deployment: &str) {
    env.object(&kinds::deployment(), deployment, |_| true).await;
    env.patch_status(
        &kinds::deployment(),
        deployment,
        json!({"conditions": [{"type": "Available", "status": "True"}]}),
    )
    .await;
}

fn names(svc: &str, kinds_names: &[(&str, &str)]) -> Vec<String> {
    kinds_names.iter().map(|(k, suffix)| format!("{k}/{svc}{suffix}")).collect()
}

const ROUTE: &str = "HTTPRoute.gateway.networking.k8s.io";
const POOL_ALPHA: &str = "InferencePool.inference.networking.x-k8s.io";
const POOL_V1: &str = "InferencePool.inference.networking.k8s.io";

fn picker_set(svc: &str) -> Vec<String> {
    names(
        svc,
        &[
            (POOL_ALPHA, "-inference-pool"),
            (POOL_V1, "-inference-pool"),
            ("Deployment.apps", "-kserve-router-scheduler"),
            ("Service", "-epp-service"),
            ("ServiceAccount", "-epp-sa"),
            ("Role.rbac.authorization.k8s.io", "-epp-role"),
            ("RoleBinding.rbac.authorization.k8s.io", "-epp-rb"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_without_scheduler_goes_to_the_service_and_is_ready_with_the_gateway_url() {
    let env = Env::new("route").await;
    let ns = env.ns.clone();
    env.apply::<LLMInferenceService>(service("r", json!({"model": {"uri": "hf://org/m"}, "router": {"route": {}}})))
        .await;
    let route = env.object(&kinds::http_route(), "r-kserve-route", |_| true).await;
    let spec = &route.data["spec"];
    assert_eq!(spec["parentRefs"][0]["name"], "gateway");
    assert_eq!(spec["parentRefs"][0]["namespace"], ns.as_str());
    let rule = &spec["rules"][0];
    assert_eq!(rule["matches"][0]["path"]["value"], format!("/{ns}/r"));
    assert_eq!(rule["filters"][0]["urlRewrite"]["path"]["replacePrefixMatch"], "/");
    assert_eq!(rule["backendRefs"][0]["kind"], "Service");
    assert_eq!(rule["backendRefs"][0]["name"], "r-kserve-workload-svc");
    assert_eq!(rule["backendRefs"][0]["port"], 8000);
    assert_eq!(route.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"], "llminferenceservice-router");

    // No Gateway yet: refused as a missing reference; no URL.
    let c = env.condition("r", "GatewaysReady", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("RefsInvalid"));
    assert!(c.message.unwrap().contains(&format!("Gateway {ns}/gateway does not exist")));
    env.condition("r", "Ready", |c| c.status == "False").await;

    gateway(&env, "gateway", Some("10.1.2.3")).await;
    env.condition("r", "GatewaysReady", |c| c.status == "True").await;
    let c = env.condition("r", "HTTPRoutesReady", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("HTTPRoutesNotReady"));
    accept_route(&env, "r-kserve-route").await;
    mark_available(&env, "r-kserve").await;
    env.condition("r", "RouterReady", |c| c.status == "True").await;
    env.condition("r", "Ready", |c| c.status == "True").await;
    let url = format!("http://10.1.2.3/{ns}/r");
    let svc = env.api::<LLMInferenceService>().get("r").await.unwrap().status.unwrap();
    assert_eq!(svc.url.as_deref(), Some(url.as_str()));
    assert_eq!(svc.addresses.unwrap()[0].url.as_deref(), Some(url.as_str()));
    let conds: Vec<String> = svc.conditions.unwrap().into_iter().map(|c| c.type_).collect();
    assert!(!conds.contains(&"InferencePoolReady".to_string()) && !conds.contains(&"SchedulerWorkloadReady".into()));

    // Managed → refs: our route goes, the user's is read (and its absence is RefsInvalid).
    let p = json!({"spec": {"router": {"route": {"http": {"refs": [{"name": "theirs"}]}}}}});
    env.api::<LLMInferenceService>().patch("r", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    env.expect_inventory(
        "route refs",
        &names("r", &[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc")]),
    )
    .await;
    let c = env.condition("r", "HTTPRoutesReady", |c| c.reason.as_deref() == Some("RefsInvalid")).await;
    assert!(c.message.unwrap().contains("theirs"));
    let theirs = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "theirs"},
        "spec": {"parentRefs": [{"name": "gateway"}], "hostnames": ["llm.example.com"],
                 "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/x"}}],
                            "backendRefs": [{"name": "r-kserve-workload-svc", "port": 8000}]}]}});
    env.dynamic(&kinds::http_route())
        .patch("theirs", &PatchParams::apply("user").force(), &Patch::Apply(&theirs))
        .await
        .unwrap();
    accept_route(&env, "theirs").await;
    env.condition("r", "Ready", |c| c.status == "True").await;
    let svc = env.api::<LLMInferenceService>().get("r").await.unwrap().status.unwrap();
    assert_eq!(svc.url.as_deref(), Some("http://llm.example.com/x"));
    let r = env.dynamic(&kinds::http_route()).get("theirs").await.unwrap();
    assert!(r.metadata.owner_references.is_none(), "a referenced route is never written");

    // Stop: the user's route stays; router conditions say Stopped.
    let stop = json!({"metadata": {"annotations": {"serving.kserve.io/stop": "true"}}});
    env.api::<LLMInferenceService>().patch("r", &PatchParams::default(), &Patch::Merge(&stop)).await.unwrap();
    env.expect_inventory("stopped", &[format!("{ROUTE}/theirs")]).await;
    let c = env.condition("r", "HTTPRoutesReady", |c| c.reason.as_deref() == Some("Stopped")).await;
    assert_eq!(c.status, "False");
    assert!(env.api::<LLMInferenceService>().get("r").await.unwrap().status.unwrap().url.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_makes_pools_and_a_picker_and_its_removal_deletes_them() {
    let env = Env::new("sched").await;
    let ns = env.ns.clone();
    gateway(&env, "gw2", Some("10.9.9.9")).await;
    let spec = json!({"model": {"uri": "hf://org/m"},
        "router": {"route": {}, "scheduler": {}, "gateway": {"refs": [{"name": "gw2"}]}}});
    env.apply::<LLMInferenceService>(service("s", spec)).await;
    let mut want =
        names("s", &[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc"), (ROUTE, "-kserve-route")]);
    want.extend(picker_set("s"));
    env.expect_inventory("scheduler", &want).await;

    let route = env.dynamic(&kinds::http_route()).get("s-kserve-route").await.unwrap();
    assert_eq!(
        route.data["spec"]["parentRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                                         "name": "gw2", "namespace": ns}])
    );
    let b = &route.data["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!((b["kind"].as_str(), b["name"].as_str()), (Some("InferencePool"), Some("s-inference-pool")));
    assert_eq!(b["group"], "inference.networking.x-k8s.io");
    let pool = env.dynamic(&kinds::pool_alpha()).get("s-inference-pool").await.unwrap();
    let p = &pool.data["spec"];
    assert_eq!(
        p["selector"],
        json!({"app.kubernetes.io/name": "s", "app.kubernetes.io/part-of": "llminferenceservice",
                                     "kserve.io/component": "workload"})
    );
    assert_eq!(p["targetPortNumber"], 8000);
    assert_eq!(p["extensionRef"]["name"], "s-epp-service");
    assert_eq!(p["extensionRef"]["portNumber"], 9002);
    let v1 = env.dynamic(&kinds::pool_v1()).get("s-inference-pool").await.unwrap();
    assert_eq!(v1.data["spec"]["selector"]["matchLabels"], p["selector"]);
    assert_eq!(v1.data["spec"]["endpointPickerRef"]["port"]["number"], 9002);
    let picker = env.object(&kinds::deployment(), "s-kserve-router-scheduler", |_| true).await;
    let pod = &picker.data["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "s-epp-sa");
    let args = pod["containers"][0]["args"].to_string();
    assert!(args.contains("s-inference-pool") && args.contains(&ns), "{args}");
    assert_eq!(pod["volumes"][0]["secret"]["optional"], true);
    let rb = env.dynamic(&kinds::role_binding()).get("s-epp-rb").await.unwrap();
    assert_eq!(rb.data["subjects"][0]["name"], "s-epp-sa");
    let epp = env.dynamic(&kinds::service()).get("s-epp-service").await.unwrap();
    assert_eq!(epp.data["spec"]["ports"][0]["port"], 9002);

    // Readiness needs the pool accepted and the picker available.
    accept_route(&env, "s-kserve-route").await;
    mark_available(&env, "s-kserve").await;
    let c = env.condition("s", "InferencePoolReady", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("InferencePoolNotReady"));
    let parent =
        json!({"parent": [{"parentRef": {"name": "gw2", "kind": "Gateway"}, "conditions": [cond("Accepted")]}]});
    env.patch_status(&kinds::pool_alpha(), "s-inference-pool", parent).await;
    env.condition("s", "InferencePoolReady", |c| c.status == "True").await;
    env.condition("s", "SchedulerWorkloadReady", |c| c.status != "True").await;
    mark_available(&env, "s-kserve-router-scheduler").await;
    env.condition("s", "Ready", |c| c.status == "True").await;
    let svc = env.api::<LLMInferenceService>().get("s").await.unwrap().status.unwrap();
    assert_eq!(svc.url, Some(format!("http://10.9.9.9/{ns}/s")));

    // pool.ref: no pool or picker of ours; the backend is the referenced pool; it must exist.
    let p = json!({"spec": {"router": {"scheduler": {"pool": {"ref": {"name": "shared-pool"}}}}}});
    env.api::<LLMInferenceService>().patch("s", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    env.expect_inventory(
        "pool.ref",
        &names("s", &[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc"), (ROUTE, "-kserve-route")]),
    )
    .await;
    env.object(&kinds::http_route(), "s-kserve-route", |r| {
        r.data["spec"]["rules"][0]["backendRefs"][0]["name"] == "shared-pool"
    })
    .await;
    let c = env.condition("s", "InferencePoolReady", |c| c.reason.as_deref() == Some("RefsInvalid")).await;
    assert!(c.message.unwrap().contains("shared-pool"));
    let conds = env.api::<LLMInferenceService>().get("s").await.unwrap().status.unwrap().conditions.unwrap();
    assert!(conds.iter().all(|c| c.type_ != "SchedulerWorkloadReady"));

    // Scheduler removed: the route goes straight to the Service.
    let p = json!({"spec": {"router": {"scheduler": null}}});
    env.api::<LLMInferenceService>().patch("s", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    env.object(&kinds::http_route(), "s-kserve-route", |r| {
        r.data["spec"]["rules"][0]["backendRefs"][0]["kind"] == "Service"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conds = env.api::<LLMInferenceService>().get("s").await.unwrap().status.unwrap().conditions.unwrap();
    assert!(conds.iter().all(|c| c.type_ != "InferencePoolReady"), "{conds:?}");

    // Router removed entirely: only the workload remains, addressed by its Service.
    let p = json!({"spec": {"router": null}});
    env.api::<LLMInferenceService>().patch("s", &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    env.expect_inventory(
        "no router",
        &names("s", &[("Deployment.apps", "-kserve"), ("Service", "-kserve-workload-svc")]),
    )
    .await;
    let url = format!("http://s-kserve-workload-svc.{ns}.svc.cluster.local:8000");
    env.condition("s", "Ready", |c| c.status == "True").await;
    let svc = env.api::<LLMInferenceService>().get("s").await.unwrap().status.unwrap();
    assert_eq!(svc.url, Some(url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_referenced_gateway_is_refs_invalid() {
    let env = Env::new("gwref").await;
    let spec = json!({"model": {"uri": "hf://org/m"},
        "router": {"route": {}, "gateway": {"refs": [{"name": "nope", "namespace": "elsewhere"}]}}});
    env.apply::<LLMInferenceService>(service("g", spec)).await;
    let c = env.condition("g", "GatewaysReady", |c| c.status == "False").await;
    assert_eq!(c.reason.as_deref(), Some("RefsInvalid"));
    assert!(c.message.unwrap().contains("Gateway elsewhere/nope does not exist"));
    let ready = env.condition("g", "Ready", |c| c.status == "False").await;
    assert_eq!(ready.reason.as_deref(), Some("RefsInvalid"));
    // The route is still applied (a dangling parent is valid Gateway API), its parent the ref.
    let r = env.object(&kinds::http_route(), "g-kserve-route", |_| true).await;
    assert_eq!(r.data["spec"]["parentRefs"][0]["name"], "nope");
    assert_eq!(r.data["spec"]["parentRefs"][0]["namespace"], "elsewhere");
}
