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

/// Labels on a workload's pods (and the selector of its Service).
pub fn workload_labels(svc: &str, role: Role) -> BTreeMap<String, String> {
    let component = match role {
        Role::Prefill => "llminferenceservice-workload-prefill",
        _ => "llminferenceservice-workload",
    };
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), svc.to_string()),
        ("app.kubernetes.io/part-of".to_string(), "llminferenceservice".to_string()),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
        ("kserve.io/component".to_string(), "workload".to_string()),
        ("llm-d.ai/role".to_string(), role.as_str().to_string()),
    ])
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
