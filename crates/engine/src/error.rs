//! The engine's one error type.

/// Why the engine refused or failed a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum EngineError {
    /// The request can never fit (prompt + max_tokens beyond max_model_len or the cache).
    #[error("{0}")]
    TooLong(String),
    /// The engine thread is gone (shut down or crashed).
    #[error("the engine is not running")]
    Stopped,
    /// A step failed; the requests in it were ended with this message.
    #[error("engine step failed: {0}")]
    Step(String),
    /// Refused now for lack of capacity (queue full, or sheddable while saturated): retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The engine lost a part it cannot run without (a tensor-parallel rank).
    #[error("the engine stopped serving: {0}")]
    Failed(String),
    /// The server is shutting down and the request did not finish in time.
    #[error("{0}")]
    Shutdown(String),
    /// The request is malformed in a way only the engine can tell (a structured-output
    /// schema or grammar that does not compile): a 400 naming `param`.
    #[error("{message}")]
    Invalid { message: String, param: String },
    /// The link to a data-parallel replica on another pod failed or was refused.
    #[error("data-parallel RPC: {0}")]
    Rpc(String),
}
