//! The runner's one error type.

/// Errors raised while executing a step.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("model: {0}")]
    Model(#[from] tessera_models::ModelError),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("LoRA adapter: {0}")]
    Lora(#[from] tessera_loader::LoadError),
    #[error("invalid step plan: {0}")]
    Plan(String),
    /// A tensor-parallel rank failed or disconnected; the group cannot continue.
    #[error("tensor-parallel rank failure: {0}")]
    Rank(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, RunnerError>;
