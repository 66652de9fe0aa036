//! The kinds the operator writes or reads, as `ApiResource`s (third-party kinds stay untyped
//! `DynamicObject`s), and which of the third-party CRDs the cluster serves.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;

fn third_party(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

pub fn deployment() -> ApiResource {
    ApiResource::erase::<Deployment>(&())
}
pub fn service() -> ApiResource {
    ApiResource::erase::<Service>(&())
}
pub fn service_account() -> ApiResource {
    ApiResource::erase::<ServiceAccount>(&())
}
pub fn role() -> ApiResource {
    ApiResource::erase::<Role>(&())
}
pub fn role_binding() -> ApiResource {
    ApiResource::erase::<RoleBinding>(&())
}
/// `leaderworkerset.x-k8s.io/v1` LeaderWorkerSet.
pub fn lws() -> ApiResource {
    third_party("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets")
}
/// Gateway API `gateway.networking.k8s.io/v1` HTTPRoute.
pub fn http_route() -> ApiResource {
    third_party("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
}
/// Gateway API `gateway.networking.k8s.io/v1` Gateway.
pub fn gateway() -> ApiResource {
    third_party("gateway.networking.k8s.io", "v1", "Gateway", "gateways")
}
/// The Inference Extension pool at KServe v1alpha1's API level (`inference.networking.x-k8s.io/v1alpha2`).
pub fn pool_alpha() -> ApiResource {
    third_party("inference.networking.x-k8s.io", "v1alpha2", "InferencePool", "inferencepools")
}
/// The GA Inference Extension pool (`inference.networking.k8s.io/v1`).
pub fn pool_v1() -> ApiResource {
    third_party("inference.networking.k8s.io", "v1", "InferencePool", "inferencepools")
}

/// Which third-party CRDs the cluster serves (found at start-up: a watch on a kind the
/// server does not have would fail forever; install the CRD, then restart the operator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Installed {
    pub lws: bool,
    pub routes: bool,
    pub gateways: bool,
    pub pool_alpha: bool,
    pub pool_v1: bool,
}

impl Installed {
    /// Every kind (tests that install every CRD).
    pub const ALL: Installed = Installed { lws: true, routes: true, gateways: true, pool_alpha: true, pool_v1: true };

    /// Ask the API server's discovery (readable by every authenticated user).
    pub async fn discover(client: &Client) -> Installed {
        // Absent only when discovery says so; other errors (an API server restarting) are
        // retried for a while rather than taken as "not installed" for the process's life.
        let has = |ar: ApiResource| async move {
            let gvk = GroupVersionKind::gvk(&ar.group, &ar.version, &ar.kind);
            for attempt in 1..=10 {
                match kube::discovery::pinned_kind(client, &gvk).await {
                    Ok(_) => return true,
                    Err(kube::Error::Api(e)) if e.code == 404 => return false,
                    Err(kube::Error::Discovery(_)) => return false,
                    Err(e) => {
                        tracing::warn!(kind = %ar.kind, attempt, "discovery failed, retrying: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                }
            }
            false
        };
        Installed {
            lws: has(lws()).await,
            routes: has(http_route()).await,
            gateways: has(gateway()).await,
            pool_alpha: has(pool_alpha()).await,
            pool_v1: has(pool_v1()).await,
        }
    }
}
