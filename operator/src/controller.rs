//! The reconcile loop: fetch the configs a service merges, combine, apply its children with
//! server-side apply (one field manager), and report conditions, URL and addresses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::{
    Addressable, LLMInferenceService, LLMInferenceServiceConfig, LLMInferenceServiceSpec, LLMInferenceServiceStatus,
};
use crate::children;
use crate::combine::{combine, config_names};
use crate::conditions::{self as cond, Conditions, Status};
use crate::kinds::{self, Installed};
use crate::template::GlobalConfig;
use crate::Error;
use crate::{desired, names, render, routing_status};

pub use crate::children::MANAGER;
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
    /// The third-party kinds the cluster serves; `None`: ask its discovery at start-up.
    pub installed: Option<Installed>,
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

fn is_stopped(svc: &LLMInferenceService) -> bool {
    svc.annotations().get(STOP_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The workload conditions that apply to `spec`'s topology: (condition, kind, object name).
fn workload_parts(svc: &str, spec: &LLMInferenceServiceSpec) -> Vec<(&'static str, &'static str, String)> {
    let mut out = vec![];
    match spec.workload.worker {
        Some(_) => out.push((cond::WORKER_WORKLOAD_READY, "LeaderWorkerSet", names::multi_node(svc))),
        None => out.push((cond::MAIN_WORKLOAD_READY, "Deployment", names::main_workload(svc))),
    }
    match spec.prefill.as_ref().map(|p| p.worker.is_some()) {
        Some(true) => {
            out.push((cond::PREFILL_WORKER_WORKLOAD_READY, "LeaderWorkerSet", names::prefill_multi_node(svc)))
        }
        Some(false) => out.push((cond::PREFILL_WORKLOAD_READY, "Deployment", names::prefill_workload(svc))),
        None => {}
    }
    out
}

const WORKLOAD_CONDITIONS: [&str; 4] = [
    cond::MAIN_WORKLOAD_READY,
    cond::WORKER_WORKLOAD_READY,
    cond::PREFILL_WORKLOAD_READY,
    cond::PREFILL_WORKER_WORKLOAD_READY,
];

/// Stopped: every workload and router condition that applies says so.
fn stopped_conditions(conds: &mut Conditions, svc: &str, spec: &LLMInferenceServiceSpec) {
    let msg = format!("the {STOP_ANNOTATION} annotation is \"true\"; workloads and router objects are deleted");
    let parts: Vec<&str> = workload_parts(svc, spec).into_iter().map(|(c, _, _)| c).collect();
    for c in WORKLOAD_CONDITIONS {
        match parts.contains(&c) {
            true => conds.set(c, Status::False, "Stopped", &msg),
            false => conds.remove(c),
        }
    }
    let router = spec.router.clone().unwrap_or_default();
    for (c, on) in routing_status::applicable(&router) {
        match on {
            true => conds.set(c, Status::False, "Stopped", &msg),
            false => conds.remove(c),
        }
    }
}

async fn reconcile(svc: Arc<LLMInferenceService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // Being deleted (foreground deletion: the garbage collector is removing the children):
    // recreating them now would fight it.
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let uid = svc.uid().unwrap_or_default();
    let client = &ctx.client;
    let installed = ctx.settings.installed.unwrap_or(Installed::ALL);
    let old = svc.status.clone().unwrap_or_default();
    let mut conds = Conditions(old.conditions.clone().unwrap_or_default());
    let mut status = LLMInferenceServiceStatus { observed_generation: svc.metadata.generation, ..old.clone() };

    let combined = match fetch_configs(&ctx, &svc).await {
        Ok(configs) => combine(&svc, &configs, &ctx.settings.global),
        Err(e) => Err(e),
    };
    // Build every object before writing any: nothing is created from an invalid spec.
    let stopped = is_stopped(&svc);
    let mut objects = combined.and_then(|spec| {
        let children = if stopped { vec![] } else { desired::children(&svc, &spec, installed)? };
        Ok((spec, children))
    });
    if let Ok((_, children)) = &objects {
        if let Err(e) = desired::check_group_sizes(client, &ns, children).await {
            objects = Err(e);
        }
    }
    match objects {
        Err(Error::Kube(e)) => return Err(Error::Kube(e)),
        Err(e) => {
            tracing::warn!(%ns, %name, reason = e.reason(), "cannot render: {e}");
            conds.set(cond::PRESETS_COMBINED, Status::False, e.reason(), &e.to_string());
            if stopped {
                // Stop needs no spec: what the service owns goes even when it cannot be rendered.
                children::delete_unwanted(client, &ns, &uid, &children::catalogue(&name, installed), &[]).await?;
                status.url = None;
                status.address = None;
                status.addresses = None;
            }
        }
        Ok((spec, children)) => {
            conds.set(cond::PRESETS_COMBINED, Status::True, "", "");
            let mut live = vec![];
            for c in &children {
                live.push(children::apply(client, &ns, c).await?);
            }
            children::delete_unwanted(client, &ns, &uid, &children::catalogue(&name, installed), &children).await?;
            if stopped {
                stopped_conditions(&mut conds, &name, &spec);
                status.url = None;
                status.address = None;
                status.addresses = None;
            } else {
                let parts = workload_parts(&name, &spec);
                for c in WORKLOAD_CONDITIONS {
                    match parts.iter().find(|(p, _, _)| *p == c) {
                        Some((_, kind, obj)) => {
                            let found = live
                                .iter()
                                .find(|l| l.types.as_ref().is_some_and(|t| t.kind == *kind) && l.name_any() == *obj);
                            routing_status::workload_condition(&mut conds, c, kind, found);
                        }
                        None => conds.remove(c),
                    }
                }
                let urls = routing_status::report(client, &svc, spec.router.as_ref(), installed, &mut conds).await?;
                let routed = spec.router.as_ref().is_some_and(|r| r.route.is_some());
                let urls = if routed { urls } else { vec![render::workload_url(&svc)] };
                let addr = |u: &String| Addressable { url: Some(u.clone()), ..Default::default() };
                status.url = urls.first().cloned();
                status.address = urls.first().map(addr);
                status.addresses = (!urls.is_empty()).then(|| urls.iter().map(addr).collect());
            }
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

/// Services in `store` in namespace `ns` (any when `None`): the ones a change of a route, pool
/// or Gateway may concern (a router may come from presets or baseRefs, not only the spec).
fn routed(
    store: &kube::runtime::reflector::Store<LLMInferenceService>,
    ns: Option<String>,
) -> Vec<ObjectRef<LLMInferenceService>> {
    store
        .state()
        .into_iter()
        .filter(|s| ns.is_none() || s.namespace() == ns)
        .map(|s| ObjectRef::from_obj(&*s))
        .collect()
}

/// Run one controller per watched namespace (or one for all) until the process is signalled.
pub async fn run(client: Client, mut settings: Settings, metrics: Arc<Metrics>) {
    let installed = match settings.installed {
        Some(i) => i,
        None => Installed::discover(&client).await,
    };
    tracing::info!(?installed, "third-party kinds served by the cluster");
    settings.installed = Some(installed);
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let ctx = Arc::new(Ctx { client: client.clone(), settings, metrics, failures: Mutex::new(HashMap::new()) });
    let runs = scopes.into_iter().map(|ns| {
        let wc = watcher::Config::default;
        let mut controller = Controller::new(scoped::<LLMInferenceService>(&client, &ns), wc());
        let store = controller.store();
        let system_ns = ctx.settings.system_namespace.clone();
        // Configs in the watched namespace and the system namespace only (all when unscoped).
        let mut config_scopes = vec![ns.clone()];
        if ns.as_ref().is_some_and(|n| *n != system_ns) {
            config_scopes.push(Some(system_ns.clone()));
        }
        for scope in config_scopes {
            let (store, system_ns) = (store.clone(), system_ns.clone());
            controller = controller.watches(
                scoped::<LLMInferenceServiceConfig>(&client, &scope),
                wc(),
                move |cfg: LLMInferenceServiceConfig| {
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
                },
            );
        }
        controller =
            controller.owns(scoped::<Deployment>(&client, &ns), wc()).owns(scoped::<Service>(&client, &ns), wc());
        let dynamic = |ar: &kube::core::ApiResource| match &ns {
            Some(n) => Api::<DynamicObject>::namespaced_with(client.clone(), n, ar),
            None => Api::<DynamicObject>::all_with(client.clone(), ar),
        };
        if installed.lws {
            let ar = kinds::lws();
            controller = controller.owns_with(dynamic(&ar), ar, wc());
        }
        // Routes (managed or referenced) and pools: services with a router in their namespace.
        for (on, ar) in [
            (installed.routes, kinds::http_route()),
            (installed.pool_alpha, kinds::pool_alpha()),
            (installed.pool_v1, kinds::pool_v1()),
        ] {
            if on {
                let store = store.clone();
                controller = controller
                    .watches_with(dynamic(&ar), ar, wc(), move |o: DynamicObject| routed(&store, o.namespace()));
            }
        }
        // Gateways: anywhere, or (scoped) in the watched namespace and the ingress gateway's.
        if installed.gateways {
            let ar = kinds::gateway();
            let apis = match &ns {
                None => vec![Api::<DynamicObject>::all_with(client.clone(), &ar)],
                Some(n) => {
                    let mut scopes = vec![n.clone(), ctx.settings.global.ingress_gateway_namespace.clone()];
                    scopes.dedup();
                    scopes.iter().map(|s| Api::<DynamicObject>::namespaced_with(client.clone(), s, &ar)).collect()
                }
            };
            for api in apis {
                let store = store.clone();
                controller =
                    controller.watches_with(api, ar.clone(), wc(), move |_: DynamicObject| routed(&store, None));
            }
        }
        controller.shutdown_on_signal().run(reconcile, error_policy, ctx.clone()).for_each(|res| async move {
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
        let name = p.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(p)).await?;
    }
    Ok(presets.len())
}
