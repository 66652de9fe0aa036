//! Multi-node workloads: a LeaderWorkerSet `<name>-kserve-mn` (or `-kserve-mn-prefill`) whose
//! leader runs the `template` (or `prefill.template`) pod and whose workers run `worker`, with
//! the group size from the parallelism, and the ServiceAccount its pods run as.
//!
//! **GPUs per node.** LWS places one pod of a group per node, so the `nvidia.com/gpu` a worker
//! pod asks for (limit, else request; the leader's when the worker has none) is what one node
//! gives the group. A pod without a GPU request (CPU serving) hosts a whole pipeline stage.
//!
//! **Group size.** Data parallel: `max(data / dataLocal, 1)` (each pod hosts `dataLocal` replicas
//! of `tensor` ranks, so it needs that many GPUs). Pipeline parallel: `tensor × pipeline` ranks
//! over pods of `min(tensor, GPUs per node)` ranks — `pipeline` pods when a stage fits a node,
//! more when tensor parallelism is wider than a node (upstream KServe issue #4946, where the
//! size stays `pipeline`). TP across nodes alone is written `{tensor: 8, pipeline: 1}`. The
//! worker spreads its ranks evenly over `LWS_GROUP_SIZE` pods and reads its place from the
//! LWS environment (`LWS_WORKER_INDEX`, `LWS_LEADER_ADDRESS`), which the presets also use for
//! the data-parallel flags.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use serde_json::json;

use crate::api::{LLMInferenceService, LLMInferenceServiceSpec, ParallelismSpec, WorkloadSpec};
use crate::children::Child;
use crate::kinds;
use crate::names::{self, Role};
use crate::parallelism::GPU;
use crate::render::{self, owned_meta};
use crate::Error;

/// Pods per group, and the GPUs each should request (when the pods ask for GPUs at all and
/// the parallelism decides the count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub size: i32,
    pub gpus_per_pod: Option<i32>,
}

/// The group of a multi-node workload with parallelism `p` on nodes of `gpus` GPUs.
pub fn group(p: &ParallelismSpec, gpus: Option<i32>, what: &str) -> Result<Group, Error> {
    let d = |v: Option<i32>| v.unwrap_or(1).max(1);
    let tensor = d(p.tensor);
    if let Some(data) = p.data {
        let local = d(p.data_local);
        if data % local != 0 {
            return Err(Error::Invalid(format!(
                "{what}parallelism.data ({data}) is not a multiple of dataLocal ({local})"
            )));
        }
        let need = local.checked_mul(tensor).ok_or_else(|| too_large(what))?;
        if let Some(g) = gpus.filter(|g| *g < need) {
            return Err(Error::Invalid(format!(
                "each {what}worker pod hosts dataLocal × tensor = {need} ranks but requests {g} {GPU}"
            )));
        }
        return Ok(Group { size: (data / local).max(1), gpus_per_pod: None });
    }
    let pipeline = d(p.pipeline);
    let per_pod = match gpus {
        Some(g) if g >= 1 && g < tensor => g,
        _ => tensor,
    };
    if tensor % per_pod != 0 {
        return Err(Error::Invalid(format!(
            "{what}parallelism.tensor ({tensor}) does not split evenly over nodes of {per_pod} {GPU}"
        )));
    }
    let ranks = pipeline.checked_mul(tensor).ok_or_else(|| too_large(what))?;
    Ok(Group { size: ranks / per_pod, gpus_per_pod: gpus.map(|_| per_pod) })
}

fn too_large(what: &str) -> Error {
    Error::Invalid(format!("{what}parallelism: the degrees multiply past {}", i32::MAX))
}

/// The `nvidia.com/gpu` of the pod's `main` container: limit, else request.
fn gpus(pod: Option<&PodSpec>) -> Option<i32> {
    let main = pod?.containers.iter().find(|c| c.name == "main")?;
    let res = main.resources.as_ref()?;
    let q = res.limits.as_ref().and_then(|l| l.get(GPU)).or_else(|| res.requests.as_ref()?.get(GPU))?;
    q.0.parse().ok()
}

fn set_gpus(pod: &mut PodSpec, n: i32) {
    let Some(main) = pod.containers.iter_mut().find(|c| c.name == "main") else { return };
    if let Some(res) = main.resources.as_mut() {
        for list in [res.limits.as_mut(), res.requests.as_mut()].into_iter().flatten() {
            if let Some(q) = list.get_mut(GPU) {
                *q = Quantity(n.to_string());
            }
        }
    }
}

/// The group of workload `w` (the main one or the prefill one).
pub fn workload_group(w: &WorkloadSpec, what: &str) -> Result<Group, Error> {
    let g = gpus(w.worker.as_ref()).or_else(|| gpus(w.template.as_ref()));
    group(&w.parallelism.clone().unwrap_or_default(), g, what)
}

/// The LWS (and its ServiceAccount, unless the pods name their own) of a multi-node workload.
pub fn children(
    svc: &LLMInferenceService,
    spec: &LLMInferenceServiceSpec,
    w: &WorkloadSpec,
    role: Role,
) -> Result<Vec<Child>, Error> {
    let what = if role == Role::Prefill { "spec.prefill." } else { "spec." };
    let g = workload_group(w, what)?;
    let name = svc.name_any();
    let lws_name = if role == Role::Prefill { names::prefill_multi_node(&name) } else { names::multi_node(&name) };
    let mut leader = w.template.clone().unwrap_or_default();
    let mut worker = w.worker.clone().unwrap_or_default();
    let mut out = vec![];
    for pod in [&mut leader, &mut worker] {
        render::prepare_pod(svc, spec, pod, role)?;
        if let Some(n) = g.gpus_per_pod {
            set_gpus(pod, n);
        }
        if pod.service_account_name.is_none() {
            pod.service_account_name = Some(lws_name.clone());
        }
    }
    if leader.service_account_name.as_deref() == Some(&lws_name)
        || worker.service_account_name.as_deref() == Some(&lws_name)
    {
        let sa = ServiceAccount {
            metadata: owned_meta(svc, lws_name.clone(), names::base_labels(&name)),
            ..Default::default()
        };
        out.push(Child::typed(&sa)?);
    }
    let leader_labels = names::leader_labels(&name, role);
    let worker_labels = names::worker_labels(&name, role);
    let annotations: BTreeMap<String, String> = svc
        .annotations()
        .iter()
        .filter(|(k, _)| {
            ["k8s.v1.cni.cncf.io", "leaderworkerset.sigs.k8s.io", "kueue.x-k8s.io"].iter().any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut meta = owned_meta(svc, lws_name, worker_labels.clone());
    if !annotations.is_empty() {
        meta.annotations = Some(annotations.clone());
    }
    let mut lws_spec = json!({
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": {"type": "RollingUpdate"},
        "leaderWorkerTemplate": {
            "size": g.size,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": {"metadata": {"labels": leader_labels, "annotations": annotations}, "spec": leader},
            "workerTemplate": {"metadata": {"labels": worker_labels, "annotations": annotations}, "spec": worker},
        },
    });
    if let Some(r) = w.replicas {
        lws_spec["replicas"] = json!(r);
    }
    out.push(Child::dynamic(kinds::lws(), meta, json!({ "spec": lws_spec })));
    Ok(out)
}

/// The size of a live LWS's groups.
pub fn live_size(live: &kube::api::DynamicObject) -> Option<i64> {
    live.data["spec"]["leaderWorkerTemplate"]["size"].as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(y: &str) -> ParallelismSpec {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn group_sizes() {
        let g = |y: &str, gpus| group(&p(y), gpus, "spec.");
        assert_eq!(g("{data: 4, dataLocal: 2}", None).unwrap().size, 2);
        assert_eq!(g("{data: 32, dataLocal: 8}", Some(8)).unwrap(), Group { size: 4, gpus_per_pod: None });
        assert_eq!(g("{data: 2, dataLocal: 2}", None).unwrap().size, 1);
        // A stage per CPU pod; a stage per node when it fits.
        assert_eq!(g("{pipeline: 3}", None).unwrap(), Group { size: 3, gpus_per_pod: None });
        assert_eq!(g("{pipeline: 2, tensor: 4}", Some(8)).unwrap(), Group { size: 2, gpus_per_pod: Some(4) });
        // Tensor parallelism wider than a node spans nodes (upstream #4946).
        assert_eq!(g("{pipeline: 1, tensor: 8}", Some(4)).unwrap(), Group { size: 2, gpus_per_pod: Some(4) });
        assert_eq!(g("{pipeline: 2, tensor: 8}", Some(4)).unwrap().size, 4);
        for (bad, gpus, needle) in [
            ("{pipeline: 1, tensor: 6}", Some(4), "does not split evenly"),
            ("{data: 4, dataLocal: 2, tensor: 4}", Some(4), "requests 4"),
            ("{data: 5, dataLocal: 2}", None, "not a multiple"),
        ] {
            let e = g(bad, gpus).unwrap_err();
            assert!(e.to_string().contains(needle) && e.reason() == "InvalidSpec", "{bad}: {e}");
        }
    }
}
