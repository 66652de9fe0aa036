//! The OpenAI-compatible HTTP front of a Tessera worker (axum).
//!
//! Owns: routes, request validation into engine requests (chat template, tokenisation),
//! JSON and SSE responses, the one error → status map ([`ApiError`]), `/metrics`,
//! `/health` (503 until a model is attached and while draining).
//! Must not touch: tensors or the scheduler — it talks to the engine only through
//! `tessera_engine::EngineHandle`.

mod chat;
mod error;
mod lora;
mod metrics;
mod routes;
mod state;

pub use chat::{ChatTemplate, TemplateMessage};
pub use error::ApiError;
pub use lora::{Adapter, AdapterCheck, LoraRegistry};
pub use routes::app;
pub use state::{AppState, Embed, KvInfo, ModelInfo, ServedModel, ToolSupport};
