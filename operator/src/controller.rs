//! The reconcile loop: fetch the configs a service merges, combine, apply its children with
//! server-side apply (one field manager), and report conditions, URL and addresses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::{Addressable, LLMInferenceService, LLMInferenceServiceConfig, LLMInferenceServiceStatus};
use crate::combine::{combine, config_names};
use crate::conditions::{self as cond, Conditions, Status};
use crate::names;
use crate::render;
use crate::template::GlobalConfig;
use crate::Error;

/// The one field manager for everything the operator applies.
pub const MANAGER: &str = "tessera-operator";
/// The annotation that stops a service.
pub const STOP_ANNOTATION: &str = "serving.kserve.io/stop";

/// What the operator needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Where the operator's presets live (looked up after the service's own namespace).
    pub system_namespace: String,
    pub global: GlobalConfig,
}

/// Reconcile counters, exported on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub reconciles:
        prometheus_client::metrics::family::Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter>,
}

impl Metrics {
    fn count(&self, result: &str) {
        self.reconciles.get_or_create(&vec![("result".to_string(), result.to_string())]).inc();
    }
}

struct Ctx {
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    failures: Mutex<HashMap<ObjectRef<LLMInferenceService>, u32>>,
}

async fn fetch_configs(ctx: &Ctx, svc: &LLMInferenceService) -> Result<Vec<LLMInferenceServiceConfig>, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let system = &ctx.settings.system_namespace;
    let local: Api<LLMInferenceServiceConfig> = Api::namespaced(ctx.client.clone(), &ns);
    let shared: Api<LLMInferenceServiceConfig> = Api::namespaced(ctx.client.clone(), system);
    let mut out = vec![];
    for name in config_names(svc) {
        let found = match local.get_opt(&name).await? {
            None if &ns != system => shared.get_opt(&name).await?,
            found => found,
        };
        out.push(found.ok_or_else(|| Error::ConfigNotFound { name, namespaces: format!("{ns}, {system}") })?);
    }
    Ok(out)
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj)).await?)
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn is_stopped(svc: &LLMInferenceService) -> bool {
    svc.annotations().get(STOP_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Apply a Deployment; one whose live selector differs (a role label changed: prefill added
/// or removed) is replaced, since selectors are immutable.
async fn apply_deployment(api: &Api<Deployment>, d: &Deployment) -> Result<Deployment, Error> {
    let name = d.metadata.name.clone().unwrap_or_default();
    if let Some(live) = api.get_opt(&name).await? {
        if live.spec.selector != d.spec.selector {
            tracing::info!(%name, "the Deployment's selector changes: replacing it");
            delete_if_present(api, &name).await?;
        }
    }
    apply(api, d).await
}

/// The objects of a single-node service (with its prefill workload, if split).
struct Children {
    main: Deployment,
    service: Service,
    prefill: Option<(Deployment, Service)>,
}

/// A workload condition (`ty`) from the Deployment's `Available` condition.
fn deployment_condition(conds: &mut Conditions, ty: &str, d: &Deployment) {
    let available = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_.as_deref() == Some("Available")));
    match available {
        Some(a) if a.status.as_deref() == Some("True") => conds.set(ty, Status::True, "", ""),
        Some(a) => conds.set(
            ty,
            if a.status.as_deref() == Some("False") { Status::False } else { Status::Unknown },
            a.reason.as_deref().unwrap_or("DeploymentUnavailable"),
            a.message.as_deref().unwrap_or(""),
        ),
        None => conds.set(
            ty,
            Status::Unknown,
            "DeploymentNotAvailableYet",
            "the Deployment reports no Available condition yet",
        ),
    }
}

/// Router objects belong to a later version: report them Unknown, never an error.
fn router_conditions(conds: &mut Conditions, spec: &crate::api::LLMInferenceServiceSpec) {
    let router = spec.router.clone().unwrap_or_default();
    let parts = [
        (cond::HTTPROUTES_READY, router.route.is_some(), "router.route"),
        (cond::GATEWAYS_READY, router.gateway.is_some(), "router.gateway"),
        (cond::INFERENCE_POOL_READY, router.scheduler.is_some(), "router.scheduler"),
        (cond::SCHEDULER_WORKLOAD_READY, router.scheduler.is_some(), "router.scheduler"),
    ];
    for (ty, wanted, field) in parts {
        if wanted {
            let msg = format!("{field} is accepted but routing is not handled by this operator version yet");
            conds.set(ty, Status::Unknown, "RoutingNotHandledYet", &msg);
        } else {
            conds.remove(ty);
        }
    }
}

async fn reconcile(svc: Arc<LLMInferenceService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let old = svc.status.clone().unwrap_or_default();
    let mut conds = Conditions(old.conditions.clone().unwrap_or_default());
    let mut status = LLMInferenceServiceStatus { observed_generation: svc.metadata.generation, ..old.clone() };

    let combined = match fetch_configs(&ctx, &svc).await {
        Ok(configs) => combine(&svc, &configs, &ctx.settings.global),
        Err(e) => Err(e),
    };
    // Build every object before writing any: nothing is created from an invalid spec.
    let objects = combined.and_then(|spec| {
        if spec.workload.worker.is_some() || spec.prefill.as_ref().is_some_and(|p| p.worker.is_some()) {
            return Ok((spec, None));
        }
        let main = render::main_deployment(&svc, &spec)?;
        let service = render::workload_service(&svc, &spec);
        let prefill = render::prefill_deployment(&svc, &spec)?.map(|d| (d, render::prefill_service(&svc)));
        Ok((spec, Some(Children { main, service, prefill })))
    });
    match objects {
        Err(Error::Kube(e)) => return Err(Error::Kube(e)),
        Err(e) => {
            tracing::warn!(%ns, %name, reason = e.reason(), "cannot combine: {e}");
            conds.set(cond::PRESETS_COMBINED, Status::False, e.reason(), &e.to_string());
        }
        Ok((spec, children)) => {
            conds.set(cond::PRESETS_COMBINED, Status::True, "", "");
            let (dep_name, svc_name) = (names::main_workload(&name), names::workload_service(&name));
            let (pre_name, pre_svc) = (names::prefill_workload(&name), names::prefill_service(&name));
            match children {
                _ if is_stopped(&svc) => {
                    for d in [&dep_name, &pre_name] {
                        delete_if_present(&deployments, d).await?;
                    }
                    for s in [&svc_name, &pre_svc] {
                        delete_if_present(&services, s).await?;
                    }
                    let msg = format!("the {STOP_ANNOTATION} annotation is \"true\"; workloads are deleted");
                    conds.set(cond::MAIN_WORKLOAD_READY, Status::False, "Stopped", &msg);
                    match spec.prefill {
                        Some(_) => conds.set(cond::PREFILL_WORKLOAD_READY, Status::False, "Stopped", &msg),
                        None => conds.remove(cond::PREFILL_WORKLOAD_READY),
                    }
                    status.url = None;
                    status.address = None;
                    status.addresses = None;
                }
                None => {
                    let msg = "multi-node (worker) workloads are not handled by this operator version yet";
                    conds.set(cond::MAIN_WORKLOAD_READY, Status::Unknown, "TopologyNotHandledYet", msg);
                }
                Some(Children { main, service, prefill }) => {
                    let live = apply_deployment(&deployments, &main).await?;
                    apply(&services, &service).await?;
                    deployment_condition(&mut conds, cond::MAIN_WORKLOAD_READY, &live);
                    match prefill {
                        Some((d, s)) => {
                            let live = apply_deployment(&deployments, &d).await?;
                            apply(&services, &s).await?;
                            deployment_condition(&mut conds, cond::PREFILL_WORKLOAD_READY, &live);
                        }
                        None => {
                            // `prefill` removed: what it created goes.
                            delete_if_present(&deployments, &pre_name).await?;
                            delete_if_present(&services, &pre_svc).await?;
                            conds.remove(cond::PREFILL_WORKLOAD_READY);
                        }
                    }
                    let url = render::workload_url(&svc);
                    status.url = Some(url.clone());
                    status.address = Some(Addressable { url: Some(url.clone()), ..Default::default() });
                    status.addresses = Some(vec![Addressable { url: Some(url), ..Default::default() }]);
                }
            }
            router_conditions(&mut conds, &spec);
        }
    }
    conds.roll_up_all();
    status.conditions = Some(conds.0);
    if status != old {
        let api: Api<LLMInferenceService> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LLMInferenceService",
            "status": status,
        });
        api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    if let Ok(mut f) = ctx.failures.lock() {
        f.remove(&ObjectRef::from_obj(&*svc));
    }
    ctx.metrics.count("ok");
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Exponential backoff per object: 1 s, 2 s, 4 s … up to 5 minutes.
fn error_policy(svc: Arc<LLMInferenceService>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.count("error");
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(ObjectRef::from_obj(&*svc)).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    tracing::warn!(
        ns = svc.namespace().unwrap_or_default(),
        name = svc.name_any(),
        attempt = n,
        "reconcile failed: {err}"
    );
    Action::requeue(Duration::from_secs(1u64 << n.min(8)).min(Duration::from_secs(300)))
}

/// An API over one namespace, or all of them.
fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Run one controller per watched namespace (or one for all) until the process is signalled.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) {
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let ctx = Arc::new(Ctx { client: client.clone(), settings, metrics, failures: Mutex::new(HashMap::new()) });
    let runs = scopes.into_iter().map(|ns| {
        let configs: Api<LLMInferenceServiceConfig> = Api::all(client.clone());
        let controller = Controller::new(scoped::<LLMInferenceService>(&client, &ns), watcher::Config::default());
        let store = controller.store();
        let system_ns = ctx.settings.system_namespace.clone();
        controller
            .owns(scoped::<Deployment>(&client, &ns), watcher::Config::default())
            .owns(scoped::<Service>(&client, &ns), watcher::Config::default())
            .watches(configs, watcher::Config::default(), move |cfg: LLMInferenceServiceConfig| {
                let (cfg_name, cfg_ns) = (cfg.name_any(), cfg.namespace().unwrap_or_default());
                store
                    .state()
                    .into_iter()
                    .filter(|s| {
                        let ns_ok = cfg_ns == system_ns || s.namespace().as_deref() == Some(cfg_ns.as_str());
                        ns_ok && config_names(s).contains(&cfg_name)
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            })
            .shutdown_on_signal()
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!("controller: {e}");
                }
            })
    });
    futures::future::join_all(runs).await;
}

/// Install (server-side apply) the shipped presets into the system namespace.
pub async fn install_presets(client: &Client, namespace: &str, image: &str) -> Result<usize, Error> {
    let api: Api<LLMInferenceServiceConfig> = Api::namespaced(client.clone(), namespace);
    let presets = crate::presets::shipped(image)?;
    for p in &presets {
        apply(&api, p).await?;
    }
    Ok(presets.len())
}
