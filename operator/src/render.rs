//! The child objects of a service, built from its effective (merged, rendered) spec: the
//! single-node Deployment and the workload Service, with model storage wired in.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ImageVolumeSource, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::api::{Criticality, LLMInferenceService, LLMInferenceServiceSpec};
use crate::names::{self, Role};
use crate::Error;

/// Where the model is mounted in the worker.
pub const MODEL_DIR: &str = "/mnt/models";
/// The worker's HTTP port.
pub const PORT: i32 = 8000;
const MODEL_VOLUME: &str = "kserve-provision-location";
const STORAGE_INIT: &str = "storage-initializer";

/// How a model URI reaches `/mnt/models`.
#[derive(Debug, PartialEq)]
pub enum Storage {
    /// `pvc://claim[/path]`: the claim, read-only, with `path` as subPath.
    Pvc { claim: String, path: Option<String> },
    /// `oci://image`: an image volume.
    Image(String),
    /// Anything `tessera fetch` downloads (`hf://`, `s3://`, `gs://`, `az://`, `http(s)://`).
    Download(String),
}

impl Storage {
    pub fn parse(uri: &str) -> Result<Self, Error> {
        Self::parse_at(uri, "spec.model.uri")
    }

    /// [`Storage::parse`] of the URI at `field` (named in the errors).
    pub fn parse_at(uri: &str, field: &str) -> Result<Self, Error> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            Error::Invalid(format!("{field} {uri:?} has no scheme; use pvc://, hf://, s3://, gs://, oci:// …"))
        })?;
        match scheme {
            "pvc" => {
                let (claim, path) = match rest.split_once('/') {
                    Some((c, p)) if !p.is_empty() => (c, Some(p.trim_end_matches('/').to_string())),
                    Some((c, _)) => (c, None),
                    None => (rest, None),
                };
                if claim.is_empty() {
                    return Err(Error::Invalid(format!("{field} {uri:?} names no claim (pvc://<claim>/<path>)")));
                }
                Ok(Storage::Pvc { claim: claim.to_string(), path })
            }
            "oci" if !rest.is_empty() => Ok(Storage::Image(rest.to_string())),
            "hf" | "s3" | "gs" | "az" | "abfs" | "http" | "https" if !rest.is_empty() => {
                Ok(Storage::Download(uri.to_string()))
            }
            _ => Err(Error::Invalid(format!(
                "{field} {uri:?}: unsupported scheme {scheme:?} (supported: pvc, hf, s3, gs, az, abfs, http, https, oci)"
            ))),
        }
    }
}

pub(crate) fn owned_meta(svc: &LLMInferenceService, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: svc.namespace(),
        labels: Some(labels),
        owner_references: svc.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Wire the model storage into a pod spec whose worker container is `main`.
fn add_storage(pod: &mut PodSpec, uri: &str) -> Result<(), Error> {
    let storage = Storage::parse(uri)?;
    let main =
        pod.containers.iter().position(|c| c.name == "main").ok_or_else(|| {
            Error::Invalid("the merged pod template has no container named \"main\" (the worker)".into())
        })?;
    let mount = |read_only: bool, sub_path: Option<String>| VolumeMount {
        name: MODEL_VOLUME.into(),
        mount_path: MODEL_DIR.into(),
        read_only: Some(read_only),
        sub_path,
        ..Default::default()
    };
    let (volume, main_mount) = match storage {
        Storage::Pvc { claim, path } => (
            Volume {
                name: MODEL_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim,
                    read_only: Some(true),
                }),
                ..Default::default()
            },
            mount(true, path),
        ),
        Storage::Image(reference) => (
            Volume {
                name: MODEL_VOLUME.into(),
                image: Some(ImageVolumeSource { reference: Some(reference), pull_policy: Some("IfNotPresent".into()) }),
                ..Default::default()
            },
            mount(true, None),
        ),
        Storage::Download(uri) => {
            let image = pod.containers[main].image.clone();
            pod.init_containers.get_or_insert_with(Vec::new).push(Container {
                name: STORAGE_INIT.into(),
                image,
                command: Some(vec!["tessera".into(), "fetch".into()]),
                args: Some(vec![uri, MODEL_DIR.into()]),
                env: pod.containers[main].env.clone(),
                volume_mounts: Some(vec![mount(false, None)]),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Default::default()
            });
            (
                Volume {
                    name: MODEL_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
                mount(true, None),
            )
        }
    };
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| v.name != MODEL_VOLUME);
    volumes.push(volume);
    let mounts = pod.containers[main].volume_mounts.get_or_insert_with(Vec::new);
    mounts.retain(|m| m.mount_path != MODEL_DIR);
    mounts.push(main_mount);
    Ok(())
}

/// The main workload's role: `both`, or `decode` when prefill is split off.
pub fn main_role(spec: &LLMInferenceServiceSpec) -> Role {
    if spec.prefill.is_some() {
        Role::Decode
    } else {
        Role::Both
    }
}

/// Labels of the main workload's pods.
fn main_labels(svc: &LLMInferenceService, spec: &LLMInferenceServiceSpec) -> BTreeMap<String, String> {
    names::workload_labels(&svc.name_any(), main_role(spec))
}

/// `spec.model.criticality` and each LoRA adapter's → `TESSERA_CRITICALITY` on the `main`
/// container (`Class` for the model, `name=Class` for an adapter, comma-separated: the worker
/// sheds Sheddable work under saturation and lets Critical work preempt), unless the template
/// sets it.
fn add_criticality(pod: &mut PodSpec, spec: &LLMInferenceServiceSpec) {
    let class = |c: Criticality| match c {
        Criticality::Critical => "Critical",
        Criticality::Standard => "Standard",
        Criticality::Sheddable => "Sheddable",
    };
    let mut parts: Vec<String> = spec.model.criticality.map(class).into_iter().map(String::from).collect();
    for a in spec.model.lora.iter().flat_map(|l| l.adapters.iter().flatten()) {
        if let (Some(name), Some(c)) = (&a.name, a.criticality) {
            parts.push(format!("{name}={}", class(c)));
        }
    }
    if parts.is_empty() {
        return;
    }
    let value = Some(parts.join(","));
    default_env(pod, EnvVar { name: CRITICALITY_ENV.into(), value, ..Default::default() });
}

/// The worker's environment variable for `--criticality`.
pub const CRITICALITY_ENV: &str = "TESSERA_CRITICALITY";
/// The worker's environment variable for `--trusted-prefillers`.
pub const TRUSTED_PREFILLERS_ENV: &str = "TESSERA_TRUSTED_PREFILLERS";
/// The port of the worker's KV-transfer service (vLLM's default `kv_port`).
pub const KV_PORT: i32 = 14579;

/// Set `name` on the `main` container unless the template already does.
fn default_env(pod: &mut PodSpec, var: EnvVar) {
    if let Some(main) = pod.containers.iter_mut().find(|c| c.name == "main") {
        let env = main.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.name == var.name) {
            env.push(var);
        }
    }
}

/// Prefill/decode: the pod's IP as `POD_IP` (the address a prefill worker advertises for its
/// KV blocks), and on decode pods the prefill pods as the only trusted prefillers.
fn add_disaggregation(svc: &LLMInferenceService, pod: &mut PodSpec, role: Role) {
    let field = ObjectFieldSelector { field_path: "status.podIP".into(), ..Default::default() };
    let pod_ip = EnvVarSource { field_ref: Some(field), ..Default::default() };
    default_env(pod, EnvVar { name: "POD_IP".into(), value_from: Some(pod_ip), ..Default::default() });
    if role == Role::Decode {
        let value = format!(
            "{}.{}.svc.cluster.local",
            names::prefill_service(&svc.name_any()),
            svc.namespace().unwrap_or_default()
        );
        default_env(pod, EnvVar { name: TRUSTED_PREFILLERS_ENV.into(), value: Some(value), ..Default::default() });
    }
}

fn deployment(
    svc: &LLMInferenceService,
    name: String,
    labels: BTreeMap<String, String>,
    replicas: Option<i32>,
    pod: PodSpec,
) -> Deployment {
    Deployment {
        metadata: owned_meta(svc, name, labels.clone()),
        spec: DeploymentSpec {
            // Nil keeps the live count, so an autoscaler can own it.
            replicas,
            selector: LabelSelector { match_labels: Some(labels.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        status: None,
    }
}

/// The prefill Deployment `<name>-kserve-prefill` (role `prefill`), when `prefill` is set.
pub fn prefill_deployment(
    svc: &LLMInferenceService,
    spec: &LLMInferenceServiceSpec,
) -> Result<Option<Deployment>, Error> {
    let Some(prefill) = &spec.prefill else { return Ok(None) };
    let labels = names::workload_labels(&svc.name_any(), Role::Prefill);
    let mut pod = prefill.template.clone().unwrap_or_default();
    prepare_pod(svc, spec, &mut pod, Role::Prefill)?;
    crate::parallelism::apply(&mut pod, prefill.parallelism.as_ref());
    let name = names::prefill_workload(&svc.name_any());
    Ok(Some(deployment(svc, name, labels, prefill.replicas, pod)))
}

/// The headless Service `<name>-kserve-prefill-workload-svc` over the prefill pods.
pub fn prefill_service(svc: &LLMInferenceService) -> Service {
    let labels = names::workload_labels(&svc.name_any(), Role::Prefill);
    let selector = names::selector(&svc.name_any(), Role::Prefill);
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    Service {
        metadata: owned_meta(svc, names::prefill_service(&svc.name_any()), labels.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            ports: Some(vec![port("http", PORT), port("kv-transfer", KV_PORT)]),
            ..Default::default()
        }),
        status: None,
    }
}

/// Wire storage, criticality and (when prefill is split off) the disaggregation settings into
/// a workload pod of `role`.
pub(crate) fn prepare_pod(
    svc: &LLMInferenceService,
    spec: &LLMInferenceServiceSpec,
    pod: &mut PodSpec,
    role: Role,
) -> Result<(), Error> {
    add_storage(pod, &spec.model.uri)?;
    crate::lora::apply(pod, spec)?;
    add_criticality(pod, spec);
    if spec.prefill.is_some() {
        add_disaggregation(svc, pod, role);
    }
    Ok(())
}

/// The single-node Deployment `<name>-kserve` (role `both`, or `decode` when prefill is set).
pub fn main_deployment(svc: &LLMInferenceService, spec: &LLMInferenceServiceSpec) -> Result<Deployment, Error> {
    let labels = main_labels(svc, spec);
    let mut pod = spec.workload.template.clone().unwrap_or_default();
    prepare_pod(svc, spec, &mut pod, main_role(spec))?;
    crate::parallelism::apply(&mut pod, spec.workload.parallelism.as_ref());
    Ok(deployment(svc, names::main_workload(&svc.name_any()), labels, spec.workload.replicas, pod))
}

/// The Service `<name>-kserve-workload-svc` in front of the workload pods.
pub fn workload_service(svc: &LLMInferenceService, spec: &LLMInferenceServiceSpec) -> Service {
    let labels = main_labels(svc, spec);
    Service {
        metadata: owned_meta(svc, names::workload_service(&svc.name_any()), labels),
        spec: Some(ServiceSpec {
            selector: Some(names::selector(&svc.name_any(), main_role(spec))),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: PORT,
                target_port: Some(IntOrString::Int(PORT)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The in-cluster URL of the workload Service.
pub fn workload_url(svc: &LLMInferenceService) -> String {
    format!(
        "http://{}.{}.svc.cluster.local:{PORT}",
        names::workload_service(&svc.name_any()),
        svc.namespace().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_uris() {
        assert_eq!(
            Storage::parse("pvc://models/llama/8b").unwrap(),
            Storage::Pvc { claim: "models".into(), path: Some("llama/8b".into()) }
        );
        assert_eq!(Storage::parse("pvc://models").unwrap(), Storage::Pvc { claim: "models".into(), path: None });
        assert_eq!(Storage::parse("hf://org/m").unwrap(), Storage::Download("hf://org/m".into()));
        assert_eq!(Storage::parse("oci://reg/img:1").unwrap(), Storage::Image("reg/img:1".into()));
        for bad in ["/mnt/x", "ftp://x", "pvc://", "hf://"] {
            let e = Storage::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn model_criticality_reaches_the_worker_env_unless_the_template_sets_it() {
        let mut spec = LLMInferenceServiceSpec::default();
        spec.model.criticality = Some(Criticality::Sheddable);
        let mut pod =
            PodSpec { containers: vec![Container { name: "main".into(), ..Default::default() }], ..Default::default() };
        add_criticality(&mut pod, &spec);
        let env = pod.containers[0].env.clone().unwrap_or_default();
        assert_eq!(env.len(), 1);
        assert_eq!((env[0].name.as_str(), env[0].value.as_deref()), (CRITICALITY_ENV, Some("Sheddable")));
        spec.model.criticality = Some(Criticality::Critical);
        add_criticality(&mut pod, &spec);
        assert_eq!(pod.containers[0].env.as_ref().map(Vec::len), Some(1), "an explicit setting wins");
    }
}
