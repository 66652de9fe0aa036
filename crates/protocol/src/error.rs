//! The protocol's one error type: a client mistake, naming the parameter at fault.

/// A request the server must refuse; maps to an OpenAI-shaped error body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ProtocolError {
    pub message: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
}

impl ProtocolError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), param: None }
    }

    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self { message: message.into(), param: Some(param.to_string()) }
    }
}
