//! The operator's error type.

/// Everything that can go wrong while turning a service into objects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("LLMInferenceServiceConfig {name:?} not found in namespace(s) {namespaces}")]
    ConfigNotFound { name: String, namespaces: String },
    #[error("template {template:?}: {message}")]
    Template { template: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("yaml: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

impl Error {
    /// The condition reason this error reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ConfigNotFound { .. } => "ConfigNotFound",
            Error::Template { .. } => "TemplateError",
            Error::Invalid(_) => "InvalidSpec",
            Error::Kube(_) => "KubernetesError",
            Error::Json(_) | Error::Yaml(_) => "CombineBaseError",
        }
    }
}
