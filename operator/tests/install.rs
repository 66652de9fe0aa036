//! The installable operator (`operator/install/`): its generated files are current, its
//! Deployment is hardened, the folder applies to the real API server, and the operator run
//! under its ServiceAccount's RBAC (impersonated) reconciles services to Ready — while a
//! layer on its client records every verb it uses: the ClusterRole covers them and grants
//! nothing more (bar the delegated and owner-reference rules, which RBAC checks differently).

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::{json, Value};
use support::eventually;
use tessera_operator::api::LLMInferenceService;
use tessera_operator::controller::{self, Metrics, Settings};
use tessera_operator::kinds;
use tessera_operator::rbac;
use tessera_operator::template::GlobalConfig;

const SYSTEM: &str = "tessera-system";
const WAIT: Duration = Duration::from_secs(40);

fn install() -> PathBuf {
    support::repo().join("operator/install")
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .env("KUBECONFIG", support::kubeconfig())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubectl {args:?}: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn generated_install_files_are_current() {
    let role = serde_yaml::to_string(&rbac::cluster_role("tessera-operator")).unwrap();
    for (file, generated, cmd) in [
        ("crds.yaml", tessera_operator::api::crds_yaml().unwrap(), "crd"),
        ("clusterrole.yaml", role, "rbac"),
        (
            "presets.yaml",
            tessera_operator::presets::shipped_yaml("ghcr.io/tessera-ai/tessera:latest").unwrap(),
            "presets",
        ),
    ] {
        let p = install().join(file);
        let committed = std::fs::read_to_string(&p).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is stale: run `cargo run -p tessera-operator -- {cmd} > {}`",
            p.display(),
            p.display()
        );
    }
}

#[test]
fn the_operator_deployment_is_non_root_read_only_and_probed() {
    let rendered = docs(&kubectl(&["kustomize", install().to_str().unwrap()], None));
    let d = rendered.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
    assert_eq!(d["metadata"]["namespace"], SYSTEM);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tessera-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert!(c["args"].to_string().contains("--no-install-presets"));
    let kinds: BTreeSet<String> = rendered.iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect();
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "LLMInferenceServiceConfig",
    ] {
        assert!(kinds.contains(k), "the install folder has no {k}: {kinds:?}");
    }
    let crb = rendered.iter().find(|d| d["kind"] == "ClusterRoleBinding").unwrap();
    assert_eq!(crb["subjects"][0]["namespace"], SYSTEM);
}

/// (verb, API group, resource[/subresource], namespace) of one request; `None` for discovery.
fn classify(method: &http::Method, uri: &http::Uri) -> Option<(String, String, String, String)> {
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, _, rest @ ..] => (*g, rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        _ => ("", rest),
    };
    let resource = match rest {
        [] => return None,
        [r] | [r, _] => r.to_string(),
        [r, _, sub, ..] => format!("{r}/{sub}"),
    };
    let watch = uri.query().unwrap_or("").split('&').any(|q| q == "watch=true" || q == "watch=1");
    let verb = match method.as_str() {
        "GET" if watch => "watch",
        "GET" if rest.len() == 1 => "list",
        "GET" => "get",
        "PATCH" => "patch",
        "DELETE" => "delete",
        "POST" => "create",
        "PUT" => "update",
        m => m,
    };
    Some((verb.into(), group.into(), resource, ns.into()))
}

type Log = Arc<Mutex<BTreeSet<(String, String, String, String)>>>;

/// A client acting as the operator's ServiceAccount, recording each request into `log`.
async fn operator_client(log: Log) -> Client {
    let kc = Kubeconfig::read_from(support::kubeconfig()).unwrap();
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{SYSTEM}:tessera-operator"));
    cfg.auth_info.impersonate_groups = Some(
        ["system:serviceaccounts", &format!("system:serviceaccounts:{SYSTEM}"), "system:authenticated"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    );
    let record = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        if let Some(entry) = classify(req.method(), req.uri()) {
            log.lock().unwrap().insert(entry);
        }
        req
    });
    ClientBuilder::try_from(cfg).unwrap().with_layer(&record).build()
}

fn cond(ty: &str) -> Value {
    json!({"type": ty, "status": "True", "reason": ty, "message": "set by the test", "lastTransitionTime": "2024-01-01T00:00:00Z"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reconciles_under_its_least_rbac_and_uses_all_of_it() {
    // Apply the folder (without what kube-apiserver 1.20 cannot take: CEL, gRPC probes).
    let mut rendered = docs(&kubectl(&["kustomize", install().to_str().unwrap()], None));
    for d in rendered.iter_mut() {
        support::strip_cel(d);
        support::downgrade_probes(d);
    }
    let stream: String = rendered.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())).collect();
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(&stream));

    let admin = support::client().await;
    let ns = format!("install-{}", std::process::id());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    let _ = Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &obj).await;
    let dynamic =
        |ar: &kube::core::ApiResource| Api::<kube::api::DynamicObject>::namespaced_with(admin.clone(), &ns, ar);
    let apply = |ar: kube::core::ApiResource, v: Value| {
        let api = dynamic(&ar);
        async move {
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            api.patch(&name, &PatchParams::apply("tessera-tests").force(), &Patch::Apply(&v)).await.unwrap()
        }
    };
    let status = |ar: kube::core::ApiResource, name: &str, s: Value| {
        let api = dynamic(&ar);
        let name = name.to_string();
        async move {
            let get = || async { api.get_opt(&name).await.ok().flatten() };
            eventually(&format!("{} {name}", ar.kind), WAIT, get).await;
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": s }))).await.unwrap();
        }
    };

    // The operator, as its ServiceAccount, scoped to this namespace.
    let log: Log = Default::default();
    let client = operator_client(log.clone()).await;
    let metrics = Arc::new(Metrics::default());
    let settings = Settings {
        namespaces: vec![ns.clone()],
        system_namespace: SYSTEM.into(),
        global: GlobalConfig { ingress_gateway_name: "gateway".into(), ingress_gateway_namespace: ns.clone() },
        installed: None,
    };
    let operator = tokio::spawn(controller::run(client, settings, metrics.clone()));

    // A sample with the whole router, to Ready.
    let gw = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "gateway"},
        "spec": {"gatewayClassName": "test", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}});
    apply(kinds::gateway(), gw).await;
    status(
        kinds::gateway(),
        "gateway",
        json!({"conditions": [cond("Programmed")], "addresses": [{"type": "IPAddress", "value": "10.0.0.7"}]}),
    )
    .await;
    let sample =
        support::fixtures().join("kserve/samples/opt-125m-cpu/llm-inference-service-facebook-opt-125m-cpu.yaml");
    kubectl(&["-n", &ns, "apply", "-f", sample.to_str().unwrap()], None);
    let svc = "facebook-opt-125m-single";
    let route = format!("{svc}-kserve-route");
    let r =
        eventually("the route", WAIT, || async { dynamic(&kinds::http_route()).get_opt(&route).await.ok().flatten() })
            .await;
    let parents: Vec<Value> = r.data["spec"]["parentRefs"].as_array().unwrap().iter()
        .map(|p| json!({"parentRef": p, "controllerName": "example.com/gw", "conditions": [cond("Accepted"), cond("ResolvedRefs")]}))
        .collect();
    status(kinds::http_route(), &route, json!({ "parents": parents })).await;
    status(
        kinds::pool_alpha(),
        &format!("{svc}-inference-pool"),
        json!({"parent": [{"parentRef": {"name": "gateway"}, "conditions": [cond("Accepted")]}]}),
    )
    .await;
    for d in [format!("{svc}-kserve"), format!("{svc}-kserve-router-scheduler")] {
        status(kinds::deployment(), &d, json!({"conditions": [{"type": "Available", "status": "True"}]})).await;
    }
    let services: Api<LLMInferenceService> = Api::namespaced(admin.clone(), &ns);
    let ready = |name: &'static str| {
        let services = services.clone();
        async move {
            eventually(&format!("{name} Ready"), WAIT, || async {
                let s = services.get(name).await.ok()?;
                let c = s.status?.conditions?.into_iter().find(|c| c.type_ == "Ready")?;
                (c.status == "True").then_some(())
            })
            .await
        }
    };
    ready("facebook-opt-125m-single").await;

    // A multi-node service, then the transitions that delete.
    let mn = json!({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService", "metadata": {"name": "mn"},
        "spec": {"model": {"uri": "hf://org/m"}, "worker": {}, "parallelism": {"data": 2, "dataLocal": 1}}});
    services.patch("mn", &PatchParams::apply("tessera-tests").force(), &Patch::Apply(&mn)).await.unwrap();
    status(kinds::lws(), "mn-kserve-mn", json!({"conditions": [cond("Available")]})).await;
    ready("mn").await;
    let merge = |name: &'static str, p: Value| {
        let services = services.clone();
        async move { services.patch(name, &PatchParams::default(), &Patch::Merge(&p)).await.unwrap() }
    };
    merge(svc, json!({"spec": {"router": {"scheduler": null}}})).await;
    eventually("the picker deleted", WAIT, || async {
        dynamic(&kinds::deployment())
            .get_opt(&format!("{svc}-kserve-router-scheduler"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let stop = json!({"metadata": {"annotations": {"serving.kserve.io/stop": "true"}}});
    merge(svc, stop.clone()).await;
    merge("mn", stop).await;
    eventually("everything stopped", WAIT, || async {
        let gone = dynamic(&kinds::http_route()).get_opt(&route).await.ok()?.is_none()
            && dynamic(&kinds::lws()).get_opt("mn-kserve-mn").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    operator.abort();

    // No request was refused (a refused one fails its reconcile).
    let errors = metrics.reconciles.get_or_create(&vec![("result".into(), "error".into())]).get();
    assert_eq!(errors, 0, "reconciles failed under the operator's RBAC (see the log)");
    let used = log.lock().unwrap().clone();
    // Scoped by --namespace: nothing cluster-wide, only this namespace and the system one.
    for (verb, group, resource, in_ns) in &used {
        assert!(
            in_ns == &ns || in_ns == SYSTEM,
            "{verb} {group}/{resource} outside the watched namespaces ({in_ns:?})"
        );
        assert!(rbac::allows(group, resource, verb), "{verb} {group}/{resource} is used but not granted");
    }
    // Everything granted was used, but the rules RBAC checks on the operator's behalf.
    let delegated = ["pods", "endpointslices", "inferencemodels", "llminferenceservices/finalizers"];
    for rule in rbac::RULES {
        for g in rule.groups {
            for r in rule.resources.iter().filter(|r| !delegated.contains(r)) {
                for v in rule.verbs {
                    // The API server checks `create` on an apply (a `patch`) that creates.
                    let seen = if *v == "create" { "patch" } else { v };
                    let hit = used.iter().any(|(uv, ug, ur, _)| uv == seen && ug == g && ur == r);
                    assert!(hit, "{v} {g}/{r} is granted but never used ({})", rule.why);
                }
            }
        }
    }
}
