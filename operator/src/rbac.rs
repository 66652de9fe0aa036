//! The least RBAC the operator needs, derived from what it reads and writes (a test runs the
//! operator under exactly these rules, records every verb it uses, and checks the two agree).
//! `tessera-operator rbac` prints them as the ClusterRole of `operator/install/`.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One rule: API groups, resources, verbs, and why the operator needs it.
pub struct Rule {
    pub groups: &'static [&'static str],
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    pub why: &'static str,
}

const WRITE: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];
const READ: &[&str] = &["get", "list", "watch"];

/// Every permission the operator uses. It writes with server-side apply (`patch`); applying an
/// object that does not exist yet is also authorised as `create`.
pub const RULES: &[Rule] = &[
    Rule {
        groups: &["serving.kserve.io"],
        resources: &["llminferenceservices"],
        verbs: &["list", "watch"],
        why: "the services it reconciles",
    },
    Rule {
        groups: &["serving.kserve.io"],
        resources: &["llminferenceservices/status"],
        verbs: &["patch"],
        why: "conditions, URL and addresses (server-side apply of the status)",
    },
    Rule {
        groups: &["serving.kserve.io"],
        resources: &["llminferenceservices/finalizers"],
        verbs: &["update"],
        why: "children's owner references block the owner's deletion (OwnerReferencesPermissionEnforcement)",
    },
    Rule {
        groups: &["serving.kserve.io"],
        resources: &["llminferenceserviceconfigs"],
        verbs: &["get", "list", "watch"],
        why: "presets and baseRefs it merges (installed by the install folder, not by the operator)",
    },
    Rule {
        groups: &["apps"],
        resources: &["deployments"],
        verbs: WRITE,
        why: "single-node workloads and the endpoint picker",
    },
    Rule {
        groups: &[""],
        resources: &["services"],
        verbs: WRITE,
        why: "workload, prefill and endpoint-picker Services",
    },
    Rule {
        groups: &[""],
        resources: &["serviceaccounts"],
        verbs: &["get", "create", "patch", "delete"],
        why: "the accounts of multi-node groups and of the endpoint picker",
    },
    Rule {
        groups: &["rbac.authorization.k8s.io"],
        resources: &["roles", "rolebindings"],
        verbs: &["get", "create", "patch", "delete"],
        why: "the endpoint picker's Role and RoleBinding",
    },
    Rule {
        groups: &["leaderworkerset.x-k8s.io"],
        resources: &["leaderworkersets"],
        verbs: WRITE,
        why: "multi-node workloads",
    },
    Rule {
        groups: &["gateway.networking.k8s.io"],
        resources: &["httproutes"],
        verbs: WRITE,
        why: "the managed route (referenced routes are only read)",
    },
    Rule {
        groups: &["gateway.networking.k8s.io"],
        resources: &["gateways"],
        verbs: READ,
        why: "Gateway readiness and the URL",
    },
    Rule {
        groups: &["inference.networking.x-k8s.io", "inference.networking.k8s.io"],
        resources: &["inferencepools"],
        verbs: WRITE,
        why: "the managed pools (a referenced pool is only read)",
    },
    Rule {
        groups: &["", "discovery.k8s.io", "inference.networking.x-k8s.io"],
        resources: &["pods", "endpointslices", "inferencemodels"],
        verbs: READ,
        why: "delegated: the endpoint picker's Role grants these, and RBAC lets only a holder grant them",
    },
];

/// Whether `RULES` grant `verb` on `group`/`resource` (`resource/sub` for subresources).
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    RULES.iter().any(|r| r.groups.contains(&group) && r.resources.contains(&resource) && r.verbs.contains(&verb))
}

/// The ClusterRole `name` with [`RULES`].
pub fn cluster_role(name: &str) -> ClusterRole {
    let strings = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    ClusterRole {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        rules: Some(
            RULES
                .iter()
                .map(|r| PolicyRule {
                    api_groups: Some(strings(r.groups)),
                    resources: Some(strings(r.resources)),
                    verbs: strings(r.verbs),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}
