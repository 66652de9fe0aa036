//! Shared server state: what is served, and whether it is ready.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tessera_engine::{Criticality, EngineHandle};
use tessera_protocol::ModelDefaults;
use tokenizers::Tokenizer;

use crate::{ApiError, ChatTemplate};

/// Names and limits known before the model is loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Accepted `model` names; the first is canonical.
    pub served_names: Vec<String>,
    /// Where the model came from (shown as `root` in `/v1/models`).
    pub root: String,
    /// Criticality of requests naming a served name (`--criticality NAME=CLASS`), else `default_criticality`.
    pub criticality: HashMap<String, Criticality>,
    pub default_criticality: Criticality,
    /// LoRA adapters served as model names (`--enable-lora`).
    pub lora: Option<Arc<crate::LoraRegistry>>,
}

impl ModelInfo {
    /// Names only; every request Standard.
    pub fn new(served_names: Vec<String>, root: String) -> Self {
        Self { served_names, root, criticality: HashMap::new(), default_criticality: Criticality::Standard, lora: None }
    }
}

/// A loaded model ready to serve.
pub struct ServedModel {
    /// Data-parallel replica 0 (its limits are every replica's); `None` for an embedding model.
    pub engine: Option<EngineHandle>,
    /// Further data-parallel replicas.
    pub replicas: Vec<EngineHandle>,
    /// Shared: requests tokenise on the blocking pool without copying it.
    pub tokenizer: std::sync::Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub defaults: ModelDefaults,
    pub vocab_size: usize,
    /// This worker's part in prefill/decode disaggregation, if any.
    pub kv: Option<KvInfo>,
    pub tools: ToolSupport,
    /// The encoder of an embedding model (`--task embed`).
    pub embedder: Option<Arc<dyn Embed>>,
}

/// An embedding model behind `/v1/embeddings`: token ids in, one vector per input out,
/// batched by its own thread.
pub trait Embed: Send + Sync {
    /// The longest input, in tokens.
    fn max_tokens(&self) -> usize;
    /// The vector length.
    fn dims(&self) -> usize;
    /// Embed every input (resolves when its batch has run).
    fn embed(&self, inputs: Vec<Vec<u32>>) -> tokio::sync::oneshot::Receiver<Result<Vec<Vec<f32>>, String>>;
}

/// Tool calling as the flags set it up (`--enable-auto-tool-choice`, `--tool-call-parser`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ToolSupport {
    /// `tool_choice: "auto"` is allowed.
    pub auto: bool,
    /// How calls are read from free text.
    pub parser: Option<tessera_protocol::ToolParser>,
}

/// A worker's part in prefill/decode disaggregation (`--kv-transfer-config`); each engine
/// answers with its own transfer address.
#[derive(Debug, Clone)]
pub struct KvInfo {
    /// Serves prefill legs.
    pub produces: bool,
    /// Serves decode legs (and proxies `x-prefiller-host-port`).
    pub consumes: bool,
    /// Prefill workers the built-in proxy may contact (`--trusted-prefillers`).
    pub trusted_prefillers: Vec<String>,
    /// The client of the prefill legs.
    pub http: reqwest::Client,
}

impl KvInfo {
    /// `roles` is (produces, consumes).
    pub fn new(roles: (bool, bool), trusted_prefillers: Vec<String>) -> Self {
        let http =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5)).build().unwrap_or_default();
        let (produces, consumes) = roles;
        Self { produces, consumes, trusted_prefillers, http }
    }
}

impl ServedModel {
    /// Every data-parallel replica, replica 0 first.
    pub fn engines(&self) -> impl Iterator<Item = &EngineHandle> {
        self.engine.iter().chain(&self.replicas)
    }

    /// The generating engine, or a 400 for an embedding model.
    pub fn generator(&self) -> Result<&EngineHandle, ApiError> {
        self.engine.as_ref().ok_or_else(|| ApiError::BadRequest {
            message: "this model serves embeddings (--task embed): use /v1/embeddings".into(),
            param: Some("model".into()),
        })
    }

    /// The longest sequence the model takes.
    pub fn max_model_len(&self) -> usize {
        match (&self.engine, &self.embedder) {
            (Some(e), _) => e.config().max_model_len,
            (None, Some(e)) => e.max_tokens(),
            (None, None) => 0,
        }
    }

    /// The replica with the least work (running + waiting), lowest index on ties.
    pub fn least_loaded(&self) -> Option<&EngineHandle> {
        use std::sync::atomic::Ordering::Relaxed;
        let load =
            |e: &EngineHandle| e.stats().running.load(Relaxed) + e.stats().waiting.load(Relaxed) + e.live_streams();
        self.engines().min_by_key(|e| load(e))
    }
}

struct Inner {
    info: ModelInfo,
    model: OnceLock<ServedModel>,
    draining: AtomicBool,
    created: u64,
}

/// Cheap-to-clone state shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AppState {
    pub fn new(info: ModelInfo) -> Self {
        Self {
            inner: Arc::new(Inner {
                info,
                model: OnceLock::new(),
                draining: AtomicBool::new(false),
                created: unix_now(),
            }),
        }
    }

    /// Attach the loaded model; from now on `/health` is 200. A second call is ignored.
    pub fn attach(&self, model: ServedModel) {
        let _ = self.inner.model.set(model);
    }

    /// Stop accepting new requests (`/health` turns 503).
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// Live engine figures, once the model is attached.
    pub fn engine_stats(&self) -> Option<Arc<tessera_engine::EngineStats>> {
        self.inner.model.get().and_then(|m| m.engine.as_ref()).map(|e| e.stats().clone())
    }

    pub(crate) fn created(&self) -> u64 {
        self.inner.created
    }

    /// Whether the server stopped taking requests.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The loaded model's engines (data-parallel replicas), none while loading.
    pub fn engines(&self) -> Vec<&EngineHandle> {
        self.inner.model.get().map(|m| m.engines().collect()).unwrap_or_default()
    }

    /// The criticality of requests that name `model`.
    pub(crate) fn criticality(&self, model: &str) -> Criticality {
        let i = &self.inner.info;
        i.criticality.get(model).copied().unwrap_or(i.default_criticality)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.inner.model.get().is_some_and(|m| m.engines().all(|e| e.stats().failure().is_none()))
            && !self.inner.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn loaded(&self) -> Option<&ServedModel> {
        self.inner.model.get()
    }

    /// The model, if it can take a new request.
    pub(crate) fn model(&self) -> Result<&ServedModel, ApiError> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(ApiError::NotReady("the server is shutting down".into()));
        }
        self.inner.model.get().ok_or_else(|| ApiError::NotReady("the model is still loading".into()))
    }

    /// Check the request's `model` against the served names and the LoRA adapters.
    pub(crate) fn check_name(&self, name: &str) -> Result<(), ApiError> {
        self.lora_for(name).map(|_| ())
    }

    /// The adapter a request's `model` names (`None`: the base model), or a 404.
    pub(crate) fn lora_for(&self, name: &str) -> Result<Option<tessera_engine::LoraRequest>, ApiError> {
        let info = &self.inner.info;
        if info.served_names.iter().any(|n| n == name) {
            return Ok(None);
        }
        match info.lora.as_ref().and_then(|r| r.get(name)) {
            Some(a) => Ok(Some(a.request())),
            None => Err(ApiError::ModelNotFound(name.to_string())),
        }
    }
}
