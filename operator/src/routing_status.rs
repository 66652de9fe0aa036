//! Router conditions and URLs from the live objects: `HTTPRoutesReady` (every route's parents
//! `Accepted` and `ResolvedRefs`), `GatewaysReady` (every parent Gateway `Programmed`),
//! `InferencePoolReady` (every pool parent `Accepted`), `SchedulerWorkloadReady` (the picker
//! Deployment `Available`); a referenced route, Gateway or pool that does not exist is
//! `RefsInvalid`. URLs come from the parent Gateways' listeners and addresses (or the route's
//! hostnames) and the route's first path match, as upstream's router discovery builds them.

use std::collections::BTreeSet;

use kube::api::DynamicObject;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::api::{LLMInferenceService, RouterSpec};
use crate::children::{self, api};
use crate::conditions::{self as cond, Conditions, Status};
use crate::kinds::{self, Installed};
use crate::names;
use crate::router::pool_name;
use crate::Error;

/// Whether condition `ty` of a status condition list is `True`.
fn cond_true(conds: &Value, ty: &str) -> bool {
    conds.as_array().into_iter().flatten().any(|c| c["type"] == ty && c["status"] == "True")
}

/// A route's parent Gateways as (namespace, name, sectionName).
fn parents(route: &DynamicObject, ns: &str) -> Vec<(String, String, Option<String>)> {
    let refs = route.data["spec"]["parentRefs"].as_array().cloned().unwrap_or_default();
    refs.iter()
        .filter(|r| r["kind"].as_str().is_none_or(|k| k == "Gateway"))
        .map(|r| {
            let s = |k: &str| r[k].as_str().map(String::from);
            (s("namespace").unwrap_or_else(|| ns.to_string()), s("name").unwrap_or_default(), s("sectionName"))
        })
        .collect()
}

/// Why a route is not ready, if it is not.
fn route_problem(route: &DynamicObject) -> Option<String> {
    let name = route.name_any();
    let want = route.data["spec"]["parentRefs"].as_array().map_or(0, Vec::len);
    let got = route.data["status"]["parents"].as_array().cloned().unwrap_or_default();
    if got.len() < want {
        return Some(format!("HTTPRoute {name}: {} of {want} parents report status", got.len()));
    }
    let generation = route.metadata.generation.unwrap_or(0);
    for p in &got {
        let stale = p["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["observedGeneration"].as_i64().is_some_and(|g| g < generation));
        for ty in ["Accepted", "ResolvedRefs"] {
            if !cond_true(&p["conditions"], ty) || stale {
                return Some(format!(
                    "HTTPRoute {name}: parent {} is not {ty}",
                    p["parentRef"]["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    None
}

/// `scheme://host[:port]path` for a route through one Gateway.
fn urls(route: &DynamicObject, gw: &DynamicObject, section: Option<&str>) -> Vec<String> {
    let listeners = gw.data["spec"]["listeners"].as_array().cloned().unwrap_or_default();
    let Some(l) = listeners.iter().find(|l| section.is_none_or(|s| l["name"] == s)) else { return vec![] };
    let https = l["protocol"] == "HTTPS";
    let port = l["port"].as_i64().unwrap_or(if https { 443 } else { 80 });
    let scheme = if https { "https" } else { "http" };
    let port = if (https && port == 443) || (!https && port == 80) { String::new() } else { format!(":{port}") };
    let path = route.data["spec"]["rules"][0]["matches"][0]["path"]["value"].as_str().unwrap_or("");
    let hostnames: Vec<String> = route.data["spec"]["hostnames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().filter(|h| !h.contains('*')).map(String::from))
        .collect();
    let hosts = if hostnames.is_empty() {
        gw.data["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["value"].as_str().map(String::from))
            .collect()
    } else {
        hostnames
    };
    hosts.into_iter().map(|h| format!("{scheme}://{h}{port}{path}")).collect()
}

/// The router conditions and whether each applies to `router` (one that does not is absent).
pub fn applicable(router: &RouterSpec) -> [(&'static str, bool); 4] {
    let scheduler = router.scheduler.is_some();
    [
        (cond::HTTPROUTES_READY, router.route.is_some()),
        (cond::GATEWAYS_READY, router.route.is_some() || !router.gateway_refs().is_empty()),
        (cond::INFERENCE_POOL_READY, scheduler),
        (cond::SCHEDULER_WORKLOAD_READY, scheduler && router.pool_ref().is_none()),
    ]
}

fn applies(router: &RouterSpec, ty: &str) -> bool {
    applicable(router).iter().any(|&(c, on)| c == ty && on)
}

/// Set the router conditions of `svc` and return its URLs (empty: no route, or no address yet).
pub async fn report(
    client: &Client,
    svc: &LLMInferenceService,
    router: Option<&RouterSpec>,
    installed: Installed,
    conds: &mut Conditions,
) -> Result<Vec<String>, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let default = RouterSpec::default();
    let router = router.unwrap_or(&default);
    let mut out = BTreeSet::new();

    // Routes: the managed one and the user's refs.
    let mut routes = vec![];
    let mut refs_invalid = None;
    if router.route.is_some() && installed.routes {
        let api = api(client, &ns, &kinds::http_route());
        let names: Vec<String> = match router.managed_route() {
            true => vec![names::route(&name)],
            false => router.route_refs().iter().map(|r| r.name.clone()).collect(),
        };
        for r in names {
            match api.get_opt(&r).await? {
                Some(live) => routes.push(live),
                None if !router.managed_route() => refs_invalid = Some(format!("HTTPRoute {ns}/{r} does not exist")),
                None => {}
            }
        }
    }
    match (&router.route, installed.routes) {
        (None, _) => conds.remove(cond::HTTPROUTES_READY),
        (Some(_), false) => conds.set(
            cond::HTTPROUTES_READY,
            Status::False,
            "GatewayAPINotInstalled",
            "the cluster does not serve HTTPRoute",
        ),
        (Some(_), true) => match (&refs_invalid, routes.iter().find_map(route_problem)) {
            (Some(m), _) => conds.set(cond::HTTPROUTES_READY, Status::False, "RefsInvalid", m),
            (None, Some(m)) => conds.set(cond::HTTPROUTES_READY, Status::False, "HTTPRoutesNotReady", &m),
            (None, None) if routes.is_empty() => {
                conds.set(cond::HTTPROUTES_READY, Status::Unknown, "HTTPRoutesNotFound", "no route yet")
            }
            (None, None) => conds.set(cond::HTTPROUTES_READY, Status::True, "", ""),
        },
    }

    // Gateways: every route's parents, and the gateway refs.
    let mut gws: BTreeSet<(String, String)> = BTreeSet::new();
    for r in &routes {
        gws.extend(parents(r, &ns).into_iter().map(|(n, g, _)| (n, g)));
    }
    for r in router.gateway_refs() {
        gws.insert((r.namespace.clone().unwrap_or_else(|| ns.clone()), r.name.clone().unwrap_or_default()));
    }
    if !applies(router, cond::GATEWAYS_READY) {
        conds.remove(cond::GATEWAYS_READY);
    } else if !installed.gateways {
        conds.set(cond::GATEWAYS_READY, Status::False, "GatewayAPINotInstalled", "the cluster does not serve Gateway");
    } else {
        let mut problem = None;
        for (gns, g) in &gws {
            match api(client, gns, &kinds::gateway()).get_opt(g).await? {
                None => {
                    problem.get_or_insert(("RefsInvalid", format!("Gateway {gns}/{g} does not exist")));
                }
                Some(live) => {
                    if !cond_true(&live.data["status"]["conditions"], "Programmed") {
                        problem.get_or_insert(("GatewaysNotReady", format!("Gateway {gns}/{g} is not Programmed")));
                    }
                    for r in &routes {
                        for (pns, pg, section) in parents(r, &ns) {
                            if (&pns, &pg) == (gns, g) {
                                out.extend(urls(r, &live, section.as_deref()));
                            }
                        }
                    }
                }
            }
        }
        match problem {
            Some((reason, m)) => conds.set(cond::GATEWAYS_READY, Status::False, reason, &m),
            None => conds.set(cond::GATEWAYS_READY, Status::True, "", ""),
        }
    }

    // The pool and the picker.
    match (&router.scheduler, pool_name(&name, router)) {
        (Some(_), Some(pool)) => {
            let by_ref = router.pool_ref().is_some();
            let ar = if installed.pool_alpha { kinds::pool_alpha() } else { kinds::pool_v1() };
            let live = if installed.pool_alpha || installed.pool_v1 {
                api(client, &ns, &ar).get_opt(&pool).await?
            } else {
                None
            };
            match live {
                None if by_ref => conds.set(
                    cond::INFERENCE_POOL_READY,
                    Status::False,
                    "RefsInvalid",
                    &format!("InferencePool {ns}/{pool} does not exist"),
                ),
                None => conds.set(cond::INFERENCE_POOL_READY, Status::Unknown, "InferencePoolNotFound", "no pool yet"),
                Some(p) => {
                    // GIE v1.1 (v1alpha2) reports `status.parent`, v1 `status.parents`.
                    let list = p.data["status"]["parent"]
                        .as_array()
                        .or(p.data["status"]["parents"].as_array())
                        .cloned()
                        .unwrap_or_default();
                    if !list.is_empty() && list.iter().all(|x| cond_true(&x["conditions"], "Accepted")) {
                        conds.set(cond::INFERENCE_POOL_READY, Status::True, "", "");
                    } else {
                        conds.set(
                            cond::INFERENCE_POOL_READY,
                            Status::False,
                            "InferencePoolNotReady",
                            &format!("InferencePool {pool} is not Accepted by its parents"),
                        );
                    }
                }
            }
            if by_ref {
                conds.remove(cond::SCHEDULER_WORKLOAD_READY);
            } else {
                let live = api(client, &ns, &kinds::deployment()).get_opt(&names::scheduler(&name)).await?;
                workload_condition(conds, cond::SCHEDULER_WORKLOAD_READY, "Deployment", live.as_ref());
            }
        }
        _ => {
            conds.remove(cond::INFERENCE_POOL_READY);
            conds.remove(cond::SCHEDULER_WORKLOAD_READY);
        }
    }
    Ok(out.into_iter().collect())
}

/// A workload condition from the `Available` condition of a live `kind` (Deployment or
/// LeaderWorkerSet).
pub fn workload_condition(conds: &mut Conditions, ty: &str, kind: &str, live: Option<&DynamicObject>) {
    match live.and_then(children::available) {
        Some((s, _, _)) if s == "True" => conds.set(ty, Status::True, "", ""),
        Some((s, reason, message)) => conds.set(
            ty,
            if s == "False" { Status::False } else { Status::Unknown },
            &if reason.is_empty() { format!("{kind}Unavailable") } else { reason },
            &message,
        ),
        None => conds.set(
            ty,
            Status::Unknown,
            &format!("{kind}NotAvailableYet"),
            &format!("the {kind} reports no Available condition yet"),
        ),
    }
}
