//! The loader's one error type. Every message names the file, tensor or field at fault.

use std::path::Path;

/// Errors raised while reading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path not found: {0}")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    Model(#[from] tessera_models::ModelError),
    #[error("{0}")]
    Source(#[from] tessera_source::SourceError),
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }

    pub(crate) fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        Self::Candle { context: context.into(), source }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, LoadError>;
