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
    /// A kind the spec needs whose CRD the cluster does not serve (reason `<Kind>NotInstalled`).
    #[error("{message}")]
    NotInstalled { reason: String, message: String },
    /// The spec changes something that may not change (reason `InvalidSpec`).
    #[error("{0}")]
    Immutable(String),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("yaml: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

impl Error {
    /// `what` needs `kind`'s CRD, which the cluster does not serve.
    pub fn not_installed(kind: &str, what: &str) -> Error {
        Error::NotInstalled {
            reason: format!("{kind}NotInstalled"),
            message: format!(
                "{what} needs the {kind} CRD, which this cluster does not serve; install it and restart the operator"
            ),
        }
    }

    /// The condition reason this error reports.
    pub fn reason(&self) -> &str {
        match self {
            Error::NotInstalled { reason, .. } => reason,
            Error::Immutable(_) => "InvalidSpec",
            Error::ConfigNotFound { .. } => "ConfigNotFound",
            Error::Template { .. } => "TemplateError",
            Error::Invalid(_) => "InvalidSpec",
            Error::Kube(_) => "KubernetesError",
            Error::Json(_) | Error::Yaml(_) => "CombineBaseError",
        }
    }
}
