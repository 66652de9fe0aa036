//! Spec types, field for field after KServe's Go types (`pkg/apis/serving/v1alpha1`).

use k8s_openapi::api::core::v1::{LocalObjectReference, PodSpec};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::LLMInferenceServiceStatus;

/// `x-kubernetes-preserve-unknown-fields` with no type (as controller-gen writes it).
fn preserve_unknown(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// A schema KServe's CRD embeds, verbatim (copied into `schemas/`, Apache-2.0 data).
fn upstream(json: &str) -> schemars::Schema {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    schemars::Schema::try_from(v).unwrap_or_default()
}

/// Pod specs are typed with k8s-openapi's `PodSpec`, but validated with the schema KServe's
/// CRD uses (controller-gen's: list/map types for server-side apply, nothing required, so
/// presets and baseRefs can fill in the rest).
fn pod_spec(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    upstream(include_str!("../../schemas/podspec.json"))
}

/// An embedded third-party spec (Gateway API `HTTPRouteSpec`, Inference Extension
/// `InferencePoolSpec`). The operator passes these through to the objects it creates, so
/// they stay untyped JSON, validated by the upstream schema KServe's CRD embeds.
macro_rules! upstream_spec {
    ($name:ident, $file:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
        #[serde(transparent)]
        pub struct $name(pub serde_json::Value);

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn inline_schema() -> bool {
                true
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                upstream(include_str!($file))
            }
        }
    };
}

upstream_spec!(
    HttpRouteSpec,
    "../../schemas/httproute-spec.json",
    "Gateway API `HTTPRouteSpec` (gateway.networking.k8s.io/v1)."
);
upstream_spec!(
    InferencePoolSpec,
    "../../schemas/inferencepool-spec.json",
    "Inference Extension `InferencePoolSpec` (inference.networking.x-k8s.io/v1alpha2)."
);

/// Request criticality, for shedding and preemption.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Criticality {
    Critical,
    Standard,
    Sheddable,
}

/// One LoRA adapter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoraAdapter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<Criticality>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown")]
    pub adapters: Option<Vec<LoraAdapter>>,
}

/// The model to serve.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LLMModelSpec {
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<Criticality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
}

impl LLMModelSpec {
    /// Nothing set (a config that leaves the model to the service).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// Parallel degrees of one workload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParallelismSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tensor: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pipeline: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub data: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub data_local: Option<i32>,
    #[serde(default, rename = "dataRPCPort", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub data_rpc_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert: Option<bool>,
}

/// A workload: the main one (inline in the spec) or the prefill one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<ParallelismSpec>,
    /// The main pod (the leader when multi-node; decode when prefill is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pod_spec")]
    pub template: Option<PodSpec>,
    /// Its presence makes the workload multi-node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pod_spec")]
    pub worker: Option<PodSpec>,
}

/// A reference to an object by name, optionally in another namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UntypedObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRefs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refs: Option<Vec<LocalObjectReference>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<HttpRouteSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRoutesSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRouteRefs>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refs: Option<Vec<UntypedObjectReference>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolRef {
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<InferencePoolSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<InferencePoolRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pod_spec")]
    pub template: Option<PodSpec>,
}

/// Routing: HTTPRoute, Gateway, Ingress and the endpoint-picker scheduler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<GatewayRoutesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<RefsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<RefsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerSpec>,
}

impl RouterSpec {
    /// `route.http.refs`: routes the user manages (read, never written).
    pub fn route_refs(&self) -> &[LocalObjectReference] {
        self.route.as_ref().and_then(|r| r.http.as_ref()).and_then(|h| h.refs.as_deref()).unwrap_or_default()
    }

    /// A route the operator manages: `route` set without `http.refs`.
    pub fn managed_route(&self) -> bool {
        self.route.is_some() && self.route_refs().is_empty()
    }

    /// `gateway.refs`: the Gateways a managed route is attached to.
    pub fn gateway_refs(&self) -> &[UntypedObjectReference] {
        self.gateway.as_ref().and_then(|g| g.refs.as_deref()).unwrap_or_default()
    }

    /// `scheduler.pool.ref`: a pool someone else runs (no pool or picker of ours).
    pub fn pool_ref(&self) -> Option<&LocalObjectReference> {
        self.scheduler.as_ref()?.pool.as_ref()?.reference.as_ref()
    }
}

/// An LLM served by Tessera workers.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "serving.kserve.io",
    version = "v1alpha1",
    kind = "LLMInferenceService",
    namespaced,
    shortname = "llmisvc",
    status = "LLMInferenceServiceStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type=='Ready')].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Ready')].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"URLs","type":"string","jsonPath":".status.addresses[*].url","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LLMInferenceServiceSpec {
    #[serde(default, skip_serializing_if = "LLMModelSpec::is_unset")]
    pub model: LLMModelSpec,
    #[serde(flatten)]
    pub workload: WorkloadSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<WorkloadSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_refs: Option<Vec<LocalObjectReference>>,
}

/// A reusable fragment of an `LLMInferenceService` spec (presets and `baseRefs`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "serving.kserve.io", version = "v1alpha1", kind = "LLMInferenceServiceConfig", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct LLMInferenceServiceConfigSpec {
    #[serde(flatten)]
    pub spec: LLMInferenceServiceSpec,
}
