//! The server's one error type and its mapping to HTTP status and OpenAI error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_engine::EngineError;
use tessera_protocol::{ErrorBody, ErrorResponse, ProtocolError};

/// Every way a request can fail, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String, param: Option<String> },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// Something the request names does not exist (an adapter) or the route is off.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotReady(String),
    /// The request asks for something this server will not do for anyone (an untrusted
    /// prefill worker).
    #[error("{0}")]
    Forbidden(String),
    /// A prefill worker answered the prefill leg with an error: its status and body, as is.
    #[error("the prefill worker answered {status}")]
    Upstream { status: u16, body: axum::body::Bytes },
    #[error("{0}")]
    TooLarge(String),
    /// No capacity now (queue full, or shed); the client should retry later.
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: None }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Upstream { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "BadRequestError",
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => "NotFoundError",
            ApiError::NotReady(_) => "ServiceUnavailableError",
            ApiError::Forbidden(_) => "PermissionDeniedError",
            ApiError::Upstream { .. } => "APIError",
            ApiError::Overloaded(_) => "RateLimitError",
            ApiError::TooLarge(_) => "BadRequestError",
            ApiError::Internal(_) => "InternalServerError",
        }
    }

    /// The OpenAI-shaped body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                kind: self.kind(),
                param: match self {
                    ApiError::BadRequest { param, .. } => param.clone(),
                    ApiError::ModelNotFound(_) => Some("model".into()),
                    _ => None,
                },
                code: self.status().as_u16(),
            },
        }
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        Self::BadRequest { message: e.message, param: e.param }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::TooLong(m) => Self::BadRequest { message: m, param: Some("messages".into()) },
            EngineError::Invalid { message, param } => Self::BadRequest { message, param: Some(param) },
            EngineError::Stopped | EngineError::Shutdown(_) | EngineError::Failed(_) | EngineError::Rpc(_) => {
                Self::NotReady(e.to_string())
            }
            EngineError::Overloaded(m) => Self::Overloaded(m),
            EngineError::Step(m) => Self::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Upstream { body, .. } = &self {
            let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
            return (self.status(), json, body.clone()).into_response();
        }
        (self.status(), Json(self.body())).into_response()
    }
}
