//! The `serving.kserve.io/v1alpha1` API: `LLMInferenceService` and
//! `LLMInferenceServiceConfig`, whose CRDs are generated from these types.

mod crd;
mod spec;
mod status;

pub use crd::{config_crd, crds_yaml, service_crd};

pub use spec::*;
pub use status::*;
