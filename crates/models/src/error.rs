//! The models crate's one error type.

/// Errors raised while building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A weight is missing from the source.
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    /// A weight has the wrong shape for the configuration.
    #[error("weight `{name}` has shape {got:?}, expected {expected:?} (from the model config)")]
    Shape { name: String, got: Vec<usize>, expected: Vec<usize> },
    /// The configuration is invalid or unsupported.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A collective between tensor-parallel ranks failed (the message names the rank).
    #[error("{0}")]
    Comm(#[from] tessera_parallel::CommError),
    /// The weight source failed (I/O, format); the message names the file and tensor.
    #[error("{0}")]
    Source(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
