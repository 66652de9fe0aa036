//! The `serving.kserve.io/v1alpha1` API: `LLMInferenceService` and
//! `LLMInferenceServiceConfig`, whose CRDs are generated from these types.

mod spec;
mod status;

pub use spec::*;
pub use status::*;

use kube::CustomResourceExt;

/// Both CRDs as one multi-document YAML (what `tessera-operator crd` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let a = serde_yaml::to_string(&LLMInferenceService::crd())?;
    let b = serde_yaml::to_string(&LLMInferenceServiceConfig::crd())?;
    Ok(format!("---\n{a}---\n{b}"))
}
