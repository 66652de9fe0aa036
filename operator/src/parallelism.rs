//! `spec.parallelism` on single-node workloads: the worker's parallelism flags and the GPUs its
//! pod requests. KServe's single-node preset ignores `parallelism`; we render it, so a service
//! asking for `tensor: 4` gets four ranks (and four GPUs when it asks for GPUs at all).

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::ParallelismSpec;

/// The extended resource a GPU rank takes.
pub const GPU: &str = "nvidia.com/gpu";

/// Ranks one single-node pod hosts: tensor × pipeline × data.
pub fn ranks(p: &ParallelismSpec) -> i32 {
    let d = |v: Option<i32>| v.unwrap_or(1).max(1);
    d(p.tensor) * d(p.pipeline) * d(p.data)
}

/// Add the flags `p` asks for to the `main` container's argument list (unless the template
/// already gives them, or runs a shell script we cannot edit), and make its GPU request, if
/// it has one, the number of ranks.
pub fn apply(pod: &mut PodSpec, p: Option<&ParallelismSpec>) {
    let Some(p) = p else { return };
    let Some(main) = pod.containers.iter_mut().find(|c| c.name == "main") else { return };
    let shell = main.command.iter().flatten().any(|c| c.ends_with("sh") || c == "-c");
    if !shell {
        let args = main.args.get_or_insert_with(Vec::new);
        let has = |args: &[String], flags: &[&str]| {
            args.iter().any(|a| flags.iter().any(|f| a == f || a.starts_with(&format!("{f}="))))
        };
        for (value, flags) in [
            (p.tensor, &["--tensor-parallel-size", "-tp"][..]),
            (p.pipeline, &["--pipeline-parallel-size", "-pp"][..]),
            (p.data, &["--data-parallel-size", "-dp"][..]),
        ] {
            if let Some(v) = value.filter(|&v| v > 1) {
                if !has(args, flags) {
                    args.extend([flags[0].to_string(), v.to_string()]);
                }
            }
        }
        if p.expert == Some(true) && !has(args, &["--enable-expert-parallel"]) {
            args.push("--enable-expert-parallel".into());
        }
    }
    let n = Quantity(ranks(p).to_string());
    if let Some(res) = main.resources.as_mut() {
        for list in [res.limits.as_mut(), res.requests.as_mut()].into_iter().flatten() {
            if let Some(q) = list.get_mut(GPU) {
                *q = n.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
    use std::collections::BTreeMap;

    fn pod(args: &[&str], gpus: Option<&str>) -> PodSpec {
        let limits = gpus.map(|g| BTreeMap::from([(GPU.to_string(), Quantity(g.into()))]));
        PodSpec {
            containers: vec![Container {
                name: "main".into(),
                command: Some(vec!["tessera".into(), "serve".into()]),
                args: Some(args.iter().map(|s| s.to_string()).collect()),
                resources: Some(ResourceRequirements { limits, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn single_node_parallelism_reaches_the_flags_and_the_gpu_request() {
        let p = ParallelismSpec { tensor: Some(4), expert: Some(true), ..Default::default() };
        let mut a = pod(&["--port", "8000"], Some("1"));
        apply(&mut a, Some(&p));
        let c = &a.containers[0];
        assert_eq!(
            c.args.clone().unwrap(),
            ["--port", "8000", "--tensor-parallel-size", "4", "--enable-expert-parallel"]
        );
        let limits = c.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits.get(GPU), Some(&Quantity("4".into())));
        // Flags the template already gives win; CPU pods get no GPU request.
        let p = ParallelismSpec { tensor: Some(2), pipeline: Some(2), ..Default::default() };
        let mut b = pod(&["-tp=8"], None);
        apply(&mut b, Some(&p));
        assert_eq!(b.containers[0].args.clone().unwrap(), ["-tp=8", "--pipeline-parallel-size", "2"]);
        assert!(b.containers[0].resources.clone().unwrap().limits.is_none());
        assert_eq!(ranks(&p), 4);
        // A degree of 1 adds nothing.
        let mut c = pod(&[], None);
        apply(&mut c, Some(&ParallelismSpec { tensor: Some(1), ..Default::default() }));
        assert!(c.containers[0].args.clone().unwrap().is_empty());
    }
}
