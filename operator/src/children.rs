//! A service's children as untyped objects: applied with server-side apply (one field manager),
//! and the ones it owns but no longer wants deleted — removing `worker`, `prefill`, `scheduler` or
//! a managed route, switching to refs, and stopping all go through [`delete_unwanted`], which
//! only ever deletes an object whose controller owner is this very service (by uid).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::core::ApiResource;
use kube::{Api, Client, Resource};
use serde_json::Value;

use crate::kinds::{self, Installed};
use crate::names::child_name;
use crate::Error;

/// The one field manager for everything the operator applies.
pub const MANAGER: &str = "tessera-operator";

/// One object to apply.
#[derive(Clone, Debug)]
pub struct Child {
    pub ar: ApiResource,
    pub obj: DynamicObject,
}

impl Child {
    /// A typed (k8s-openapi) object.
    pub fn typed<K: Resource<DynamicType = ()> + serde::Serialize>(k: &K) -> Result<Child, Error> {
        let ar = ApiResource::erase::<K>(&());
        let obj: DynamicObject = serde_json::from_value(serde_json::to_value(k)?)?;
        Ok(Child { ar, obj })
    }

    /// A third-party object: `meta` plus top-level fields `data` (`{"spec": …}`).
    pub fn dynamic(ar: ApiResource, meta: ObjectMeta, data: Value) -> Child {
        let mut obj = DynamicObject::new(meta.name.as_deref().unwrap_or_default(), &ar).data(data);
        obj.metadata = meta;
        Child { ar, obj }
    }

    pub fn name(&self) -> &str {
        self.obj.metadata.name.as_deref().unwrap_or_default()
    }

    fn is(&self, ar: &ApiResource, name: &str) -> bool {
        same_kind(&self.ar, ar) && self.name() == name
    }
}

fn same_kind(a: &ApiResource, b: &ApiResource) -> bool {
    a.group == b.group && a.kind == b.kind && a.version == b.version
}

pub fn api(client: &Client, ns: &str, ar: &ApiResource) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, ar)
}

/// Apply `child`. A Deployment whose live selector differs (a role label changed) is
/// replaced first, since selectors are immutable.
pub async fn apply(client: &Client, ns: &str, child: &Child) -> Result<DynamicObject, Error> {
    let api = api(client, ns, &child.ar);
    let name = child.name();
    if same_kind(&child.ar, &kinds::deployment()) {
        if let Some(live) = api.get_opt(name).await? {
            if live.data["spec"]["selector"] != child.obj.data["spec"]["selector"] {
                let owner = |o: &DynamicObject| {
                    o.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .find(|r| r.controller == Some(true))
                        .map(|r| r.uid.clone())
                };
                if owner(&live) != owner(&child.obj) {
                    return Err(Error::Invalid(format!(
                        "Deployment {name} exists and is not this service's; rename or delete it"
                    )));
                }
                tracing::info!(%name, "the Deployment's selector changes: replacing it");
                delete_exact(&api, &live).await?;
            }
        }
    }
    Ok(api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&child.obj)).await?)
}

/// Delete exactly this object (its uid), if it is still there.
async fn delete_exact(api: &Api<DynamicObject>, live: &DynamicObject) -> Result<(), Error> {
    let name = live.metadata.name.clone().unwrap_or_default();
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: live.metadata.uid.clone(), resource_version: None }),
        ..DeleteParams::background()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Every object the operator may create for service `svc`, by kind and name (kinds the
/// cluster does not serve are left out).
pub fn catalogue(svc: &str, installed: Installed) -> Vec<(ApiResource, String)> {
    let n = |suffix: &str| child_name(svc, suffix);
    let mut out = vec![
        (kinds::deployment(), n("-kserve")),
        (kinds::deployment(), n("-kserve-prefill")),
        (kinds::deployment(), n("-kserve-router-scheduler")),
        (kinds::service(), n("-kserve-workload-svc")),
        (kinds::service(), n("-kserve-prefill-workload-svc")),
        (kinds::service(), n("-epp-service")),
        (kinds::service_account(), n("-kserve-mn")),
        (kinds::service_account(), n("-kserve-mn-prefill")),
        (kinds::service_account(), n("-epp-sa")),
        (kinds::role(), n("-epp-role")),
        (kinds::role_binding(), n("-epp-rb")),
    ];
    let mut add = |on: bool, ar: fn() -> ApiResource, suffixes: &[&str]| {
        if on {
            out.extend(suffixes.iter().map(|s| (ar(), n(s))));
        }
    };
    add(installed.lws, kinds::lws, &["-kserve-mn", "-kserve-mn-prefill"]);
    add(installed.routes, kinds::http_route, &["-kserve-route"]);
    add(installed.pool_alpha, kinds::pool_alpha, &["-inference-pool"]);
    add(installed.pool_v1, kinds::pool_v1, &["-inference-pool"]);
    out
}

/// Delete each catalogued object not in `wanted` whose controller owner is the service with
/// `uid` (a user's object of the same name, or one another controller owns, is never touched).
pub async fn delete_unwanted(
    client: &Client,
    ns: &str,
    uid: &str,
    catalogue: &[(ApiResource, String)],
    wanted: &[Child],
) -> Result<(), Error> {
    for (ar, name) in catalogue {
        if wanted.iter().any(|c| c.is(ar, name)) {
            continue;
        }
        let api = api(client, ns, ar);
        let Some(live) = api.get_opt(name).await? else { continue };
        let ours = live.metadata.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid);
        if ours {
            tracing::info!(kind = %ar.kind, %name, "no longer wanted: deleting");
            delete_exact(&api, &live).await?;
        }
    }
    Ok(())
}

/// The `Available` condition of a live Deployment or LeaderWorkerSet, as (status, reason,
/// message); `None` while it reports none.
pub fn available(live: &DynamicObject) -> Option<(String, String, String)> {
    let conds = live.data["status"]["conditions"].as_array()?;
    let c = conds.iter().find(|c| c["type"] == "Available")?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}
