//! The router and the small endpoints.

mod chat;
mod completions;
mod disagg;
mod embeddings;
mod generate;
mod logprobs;
mod proxy;
mod tokenize;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tessera_protocol::{ModelCard, ModelList};

use crate::state::unix_now;
use crate::{ApiError, AppState, ServedModel};

/// Build the HTTP application.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/embeddings", post(embeddings::handle))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(crate::lora::load))
        .route("/v1/unload_lora_adapter", post(crate::lora::unload))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Parse a JSON body; errors are OpenAI-shaped 400s naming the problem and the field.
pub(crate) fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!("request body too large: {}", e.body_text())),
        _ => ApiError::bad(format!("cannot read the request body: {}", e.body_text())),
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != "." && !path.is_empty()).then_some(path);
        let inner = e.into_inner();
        let message = match &param {
            Some(p) => format!("invalid request body: `{p}`: {inner}"),
            None => format!("invalid request body: {inner}"),
        };
        ApiError::BadRequest { message, param }
    })
}

async fn health(State(st): State<AppState>) -> StatusCode {
    if st.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn models(State(st): State<AppState>) -> Json<ModelList> {
    let max_model_len = st.loaded().map_or(0, ServedModel::max_model_len);
    let info = st.info();
    let data = info
        .served_names
        .iter()
        .map(|n| ModelCard {
            id: n.clone(),
            object: "model",
            created: st.created(),
            owned_by: "tessera",
            root: info.root.clone(),
            parent: None,
            max_model_len,
        })
        .chain(info.lora.iter().flat_map(|r| r.list()).map(|a| ModelCard {
            id: a.name,
            object: "model",
            created: st.created(),
            owned_by: "tessera",
            root: a.source,
            parent: info.served_names.first().cloned(),
            max_model_len,
        }))
        .collect();
    Json(ModelList { object: "list", data })
}

async fn metrics(State(st): State<AppState>) -> Response {
    let Some(m) = st.loaded() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "model loading\n").into_response();
    };
    let name = st.info().served_names.first().cloned().unwrap_or_default();
    let stats: Vec<_> = m.engines().map(|e| e.stats().clone()).collect();
    let max_lora = st.info().lora.as_ref().map_or(0, |r| r.max_loras);
    match crate::metrics::render(&stats, &name, max_lora) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(_) => ApiError::Internal("metrics encoding failed".into()).into_response(),
    }
}

async fn not_found() -> Response {
    let body = serde_json::json!({"error": {"message": "no such endpoint", "type": "NotFoundError", "param": null, "code": 404}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

pub(crate) fn request_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(unix_now());
    format!("{prefix}-{r:016x}")
}
