//! The wiring's one error type.

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A flag value that cannot work; the message says which and what to change.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Load(#[from] tessera_loader::LoadError),
    #[error(transparent)]
    Source(#[from] tessera_source::SourceError),
    #[error(transparent)]
    Model(#[from] tessera_models::ModelError),
    #[error(transparent)]
    Runner(#[from] tessera_runner::RunnerError),
    #[error(transparent)]
    Comm(#[from] tessera_parallel::CommError),
    #[error(transparent)]
    Engine(#[from] tessera_engine::EngineError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
