//! The router objects of a service: the managed HTTPRoute `<name>-kserve-route`, the
//! InferencePool `<name>-inference-pool` (at KServe v1alpha1's API level,
//! `inference.networking.x-k8s.io/v1alpha2`, plus the GA `inference.networking.k8s.io/v1` pool
//! when the cluster serves it), and the endpoint picker (`<name>-kserve-router-scheduler`
//! Deployment, `<name>-epp-service`, `<name>-epp-sa`, `-epp-role`, `-epp-rb`).
//!
//! Deliberate differences from upstream: the picker's `tls-certs` Secret volume is optional
//! (upstream's certificate Secret is not something this operator creates), no cluster-wide
//! `system:auth-delegator` binding (it needs cluster RBAC writes; our scheduler preset serves
//! metrics without auth), and no InferenceModel (not in the contract).

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::api::{LLMInferenceService, LLMInferenceServiceSpec, RouterSpec};
use crate::children::Child;
use crate::kinds::{self, Installed};
use crate::names;
use crate::render::{owned_meta, PORT};
use crate::Error;

/// The endpoint picker's gRPC port (the pool's extension port).
pub const EPP_PORT: i32 = 9002;
const POOL_ALPHA_GROUP: &str = "inference.networking.x-k8s.io";
const POOL_V1_GROUP: &str = "inference.networking.k8s.io";

/// The pool the route's backend and the status read: `pool.ref`, or the managed one.
pub fn pool_name(svc: &str, router: &RouterSpec) -> Option<String> {
    router.scheduler.as_ref()?;
    Some(router.pool_ref().map(|r| r.name.clone()).unwrap_or_else(|| names::pool(svc)))
}

/// Every router object the spec asks for.
pub fn children(
    svc: &LLMInferenceService,
    spec: &LLMInferenceServiceSpec,
    installed: Installed,
) -> Result<Vec<Child>, Error> {
    let Some(router) = &spec.router else { return Ok(vec![]) };
    let name = svc.name_any();
    let mut out = vec![];
    if router.managed_route() {
        if !installed.routes {
            return Err(Error::not_installed("GatewayAPI", "spec.router.route"));
        }
        let meta = owned_meta(svc, names::route(&name), names::router_labels(&name, false));
        out.push(Child::dynamic(kinds::http_route(), meta, json!({ "spec": route_spec(svc, router, installed) })));
    }
    if let Some(s) = &router.scheduler {
        if router.pool_ref().is_none() {
            if !(installed.pool_alpha || installed.pool_v1) {
                return Err(Error::not_installed("InferencePool", "spec.router.scheduler"));
            }
            let pool_spec = s.pool.as_ref().and_then(|p| p.spec.as_ref()).map(|p| p.0.clone()).unwrap_or(json!({}));
            let alpha = alpha_pool(&name, pool_spec);
            let meta = || owned_meta(svc, names::pool(&name), names::router_labels(&name, true));
            if installed.pool_alpha {
                out.push(Child::dynamic(kinds::pool_alpha(), meta(), json!({ "spec": alpha })));
            }
            if installed.pool_v1 {
                out.push(Child::dynamic(kinds::pool_v1(), meta(), json!({ "spec": v1_pool(&alpha) })));
            }
            out.extend(picker(svc, s.template.clone().unwrap_or_default())?);
        }
    }
    Ok(out)
}

/// The merged `route.http.spec`, with the gateway refs as parents and the backend pointed at
/// the pool this service uses (or its workload Service when there is no scheduler).
fn route_spec(svc: &LLMInferenceService, router: &RouterSpec, installed: Installed) -> Value {
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    let http = router.route.as_ref().and_then(|r| r.http.as_ref());
    let mut spec = http.and_then(|h| h.spec.clone()).map_or(json!({}), |s| s.0);
    let refs = router.gateway_refs();
    if !refs.is_empty() {
        spec["parentRefs"] = refs
            .iter()
            .map(|r| {
                json!({"group": "gateway.networking.k8s.io", "kind": "Gateway",
                       "name": r.name.clone().unwrap_or_default(),
                       "namespace": r.namespace.clone().unwrap_or_else(|| ns.clone())})
            })
            .collect();
    }
    let pool = pool_name(&name, router);
    let pool_group = if installed.pool_alpha || !installed.pool_v1 { POOL_ALPHA_GROUP } else { POOL_V1_GROUP };
    for rule in spec["rules"].as_array_mut().into_iter().flatten() {
        for b in rule["backendRefs"].as_array_mut().into_iter().flatten() {
            if b["kind"] != "InferencePool" {
                continue;
            }
            *b = match &pool {
                Some(pool) => json!({"group": pool_group, "kind": "InferencePool", "name": pool,
                                     "port": b.get("port").cloned().unwrap_or(json!(PORT)), "weight": b.get("weight").cloned().unwrap_or(json!(1))}),
                // `group` omitted: the core group is its default (and an empty string is not
                // accepted by every API server version).
                None => json!({"kind": "Service", "name": names::workload_service(&name),
                               "port": PORT, "weight": b.get("weight").cloned().unwrap_or(json!(1))}),
            };
        }
    }
    spec
}

/// The v1alpha2 pool: the merged `pool.spec`, an empty selector filled with the workload
/// selector, and the picker as its extension.
fn alpha_pool(name: &str, mut spec: Value) -> Value {
    if spec["selector"].as_object().is_none_or(|s| s.is_empty()) {
        spec["selector"] = json!(names::pool_selector(name));
    }
    if spec["targetPortNumber"].is_null() {
        spec["targetPortNumber"] = json!(PORT);
    }
    let ext = &mut spec["extensionRef"];
    for (k, v) in [
        ("name", json!(names::epp_service(name))),
        ("kind", json!("Service")),
        ("failureMode", json!("FailOpen")),
        ("portNumber", json!(EPP_PORT)),
    ] {
        if ext[k].is_null() {
            ext[k] = v;
        }
    }
    spec
}

/// The same pool at the GA API (`selector.matchLabels`, `targetPorts`, `endpointPickerRef`).
fn v1_pool(alpha: &Value) -> Value {
    let ext = &alpha["extensionRef"];
    json!({
        "selector": {"matchLabels": alpha["selector"]},
        "targetPorts": [{"number": alpha["targetPortNumber"]}],
        "endpointPickerRef": {"name": ext["name"], "kind": "Service", "port": {"number": ext["portNumber"]},
                              "failureMode": ext["failureMode"]},
    })
}

/// The endpoint picker: Deployment, Service, and the RBAC it needs to read its pool's pods.
fn picker(svc: &LLMInferenceService, mut pod: k8s_openapi::api::core::v1::PodSpec) -> Result<Vec<Child>, Error> {
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    let labels = names::router_labels(&name, true);
    let meta = |n: String| owned_meta(svc, n, labels.clone());
    let mut out = vec![];
    let sa = match pod.service_account_name.clone() {
        Some(sa) => sa,
        None => {
            let sa = names::epp_service_account(&name);
            out.push(Child::typed(&ServiceAccount { metadata: meta(sa.clone()), ..Default::default() })?);
            pod.service_account_name = Some(sa.clone());
            sa
        }
    };
    // The certificate Secret is someone else's to create: do not hold the pod until it exists.
    for v in pod.volumes.iter_mut().flatten() {
        if let Some(secret) = v.secret.as_mut() {
            secret.optional = Some(true);
        }
    }
    let deployment = Deployment {
        metadata: meta(names::scheduler(&name)),
        spec: DeploymentSpec {
            selector: LabelSelector { match_labels: Some(labels.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels.clone()), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        status: None,
    };
    let port = |n: &str, p: i32| ServicePort {
        name: Some(n.into()),
        port: p,
        target_port: Some(IntOrString::String(n.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let service = Service {
        metadata: meta(names::epp_service(&name)),
        spec: Some(ServiceSpec {
            selector: Some(labels.clone()),
            ports: Some(vec![port("grpc", EPP_PORT), port("grpc-health", 9003), port("metrics", 9090)]),
            ..Default::default()
        }),
        status: None,
    };
    let rule = |groups: &[&str], resources: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: ["get", "list", "watch"].iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(names::epp_role(&name)),
        rules: Some(vec![
            rule(&[""], &["pods"]),
            rule(&[POOL_ALPHA_GROUP], &["inferencepools", "inferencemodels"]),
            rule(&[POOL_V1_GROUP], &["inferencepools"]),
            rule(&["discovery.k8s.io"], &["endpointslices"]),
        ]),
    };
    let binding = RoleBinding {
        metadata: meta(names::epp_role_binding(&name)),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: names::epp_role(&name),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa,
            namespace: Some(ns),
            ..Default::default()
        }]),
    };
    out.extend([Child::typed(&deployment)?, Child::typed(&service)?, Child::typed(&role)?, Child::typed(&binding)?]);
    Ok(out)
}
