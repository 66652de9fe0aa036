//! Child object names (knative's `ChildName`) and the labels the contract puts on children.

use std::collections::BTreeMap;

use md5::{Digest, Md5};

const LONGEST: usize = 63;
const HEAD: usize = LONGEST - 32;

/// knative `kmeta.ChildName`: `parent + suffix`, or, past 63 characters, a truncated parent
/// plus the md5 of the parent, so names stay unique and valid.
pub fn child_name(parent: &str, suffix: &str) -> String {
    if parent.len() + suffix.len() <= LONGEST {
        return format!("{parent}{suffix}");
    }
    if HEAD <= suffix.len() {
        let hash = hex(&Md5::digest(format!("{parent}{suffix}").as_bytes()));
        let mut ret = format!("{}{hash}", &parent[..parent.len().min(HEAD)]);
        if ret.len() < LONGEST {
            ret.push_str(&suffix[..LONGEST - ret.len()]);
        }
        return ret.trim_end_matches('-').to_string();
    }
    let hash = hex(&Md5::digest(parent.as_bytes()));
    format!("{}{hash}{suffix}", &parent[..HEAD - suffix.len()])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The names of a service's children.
pub fn main_workload(svc: &str) -> String {
    child_name(svc, "-kserve")
}
pub fn workload_service(svc: &str) -> String {
    child_name(svc, "-kserve-workload-svc")
}
pub fn prefill_workload(svc: &str) -> String {
    child_name(svc, "-kserve-prefill")
}
/// The headless Service whose DNS name resolves to the prefill pods (the decode workers
/// trust exactly those addresses as prefillers).
pub fn prefill_service(svc: &str) -> String {
    child_name(svc, "-kserve-prefill-workload-svc")
}

/// The LeaderWorkerSet of a multi-node workload (and its ServiceAccount).
pub fn multi_node(svc: &str) -> String {
    child_name(svc, "-kserve-mn")
}
pub fn prefill_multi_node(svc: &str) -> String {
    child_name(svc, "-kserve-mn-prefill")
}
pub fn route(svc: &str) -> String {
    child_name(svc, "-kserve-route")
}
pub fn pool(svc: &str) -> String {
    child_name(svc, "-inference-pool")
}
pub fn scheduler(svc: &str) -> String {
    child_name(svc, "-kserve-router-scheduler")
}
pub fn epp_service(svc: &str) -> String {
    child_name(svc, "-epp-service")
}
pub fn epp_service_account(svc: &str) -> String {
    child_name(svc, "-epp-sa")
}
pub fn epp_role(svc: &str) -> String {
    child_name(svc, "-epp-role")
}
pub fn epp_role_binding(svc: &str) -> String {
    child_name(svc, "-epp-rb")
}

/// Which workload a pod belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves whole requests (no prefill split).
    Both,
    Decode,
    Prefill,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Both => "both",
            Role::Decode => "decode",
            Role::Prefill => "prefill",
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `app.kubernetes.io/name` and `part-of`: on every child.
pub fn base_labels(svc: &str) -> BTreeMap<String, String> {
    labels(&[("app.kubernetes.io/name", svc), ("app.kubernetes.io/part-of", "llminferenceservice")])
}

/// What a workload Service selects: the serving pods of one role — single-node pods and
/// multi-node leaders alike (workers carry no `kserve.io/component`).
pub fn selector(svc: &str, role: Role) -> BTreeMap<String, String> {
    let mut l = base_labels(svc);
    l.extend(labels(&[("kserve.io/component", "workload"), ("llm-d.ai/role", role.as_str())]));
    l
}

/// What an InferencePool selects: every serving pod, decode and prefill (the endpoint
/// picker tells them apart by `llm-d.ai/role`).
pub fn pool_selector(svc: &str) -> BTreeMap<String, String> {
    let mut l = base_labels(svc);
    l.insert("kserve.io/component".into(), "workload".into());
    l
}

/// Labels on a single-node workload's pods (and its Deployment's selector).
pub fn workload_labels(svc: &str, role: Role) -> BTreeMap<String, String> {
    let component = match role {
        Role::Prefill => "llminferenceservice-workload-prefill",
        _ => "llminferenceservice-workload",
    };
    let mut l = selector(svc, role);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l
}

/// Labels on a multi-node group's leader pod.
pub fn leader_labels(svc: &str, role: Role) -> BTreeMap<String, String> {
    let component = match role {
        Role::Prefill => "llminferenceservice-workload-leader-prefill",
        _ => "llminferenceservice-workload-leader",
    };
    let mut l = selector(svc, role);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l
}

/// Labels on a multi-node group's worker pods (and on the LeaderWorkerSet).
pub fn worker_labels(svc: &str, role: Role) -> BTreeMap<String, String> {
    let component = match role {
        Role::Prefill => "llminferenceservice-workload-worker-prefill",
        _ => "llminferenceservice-workload-worker",
    };
    let mut l = base_labels(svc);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l
}

/// Labels on the router objects (route, pool) and, with `scheduler`, on the endpoint picker.
pub fn router_labels(svc: &str, scheduler: bool) -> BTreeMap<String, String> {
    let component = if scheduler { "llminferenceservice-router-scheduler" } else { "llminferenceservice-router" };
    let mut l = base_labels(svc);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_concatenated() {
        assert_eq!(child_name("svc", "-kserve"), "svc-kserve");
        assert_eq!(workload_service("a"), "a-kserve-workload-svc");
    }

    #[test]
    fn long_names_are_hashed_to_63_chars() {
        let parent = "a".repeat(60);
        let n = child_name(&parent, "-kserve-workload-svc");
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("-kserve-workload-svc"));
        // Distinct parents with a common prefix stay distinct.
        assert_ne!(n, child_name(&format!("{parent}b"), "-kserve-workload-svc"));
        // md5("a"*60), computed independently with `printf 'a%.0s' {1..60} | md5sum`.
        assert_eq!(n, format!("{}cc7ed669cf88f201c3297c6a91e1d18d-kserve-workload-svc", &parent[..11]));
        // A suffix longer than 31 chars: the whole string is hashed.
        let long = child_name("svc", &format!("-{}", "x".repeat(70)));
        assert!(long.len() <= 63 && long.starts_with("svc"), "{long}");
    }
}
