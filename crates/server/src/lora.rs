//! LoRA adapters served as model names (vLLM's multi-LoRA): the registry of adapters by
//! name, and `POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter`, answered only when
//! runtime updating is on (vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use serde::Deserialize;
use tessera_engine::LoraRequest;

use crate::{ApiError, AppState};

/// Resolve an adapter's source (a directory or a model URI) to a local directory and check it
/// against the served model (rank, targets, shapes); the message says what is wrong.
pub type AdapterCheck = Arc<dyn Fn(&str, &str) -> Result<PathBuf, String> + Send + Sync>;

/// One registered adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// Unique per registration: an adapter loaded again under the same name is a new id, so
    /// nothing cached under the old one is reused.
    pub id: u32,
    pub name: String,
    /// As given (`--lora-modules` or `lora_path`).
    pub source: String,
    /// The local PEFT directory.
    pub path: PathBuf,
}

/// The adapters served by name.
pub struct LoraRegistry {
    adapters: RwLock<Vec<Adapter>>,
    next_id: AtomicU32,
    /// `--max-loras`: adapters in one batch.
    pub max_loras: usize,
    /// `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are served.
    pub runtime_updates: bool,
    check: AdapterCheck,
}

impl std::fmt::Debug for LoraRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoraRegistry({:?})", self.list().iter().map(|a| a.name.clone()).collect::<Vec<_>>())
    }
}

impl LoraRegistry {
    pub fn new(check: AdapterCheck, max_loras: usize, runtime_updates: bool) -> Self {
        Self { adapters: RwLock::new(vec![]), next_id: AtomicU32::new(1), max_loras, runtime_updates, check }
    }

    /// Check and add `name` (blocking: it may download the adapter). Refused when the name is
    /// taken or the adapter does not fit the model.
    pub fn register(&self, name: &str, source: &str) -> Result<Adapter, String> {
        if name.is_empty() {
            return Err("the adapter name is empty".into());
        }
        if self.get(name).is_some() {
            return Err(format!("The lora adapter '{name}' has already been loaded."));
        }
        let path = (self.check)(name, source)?;
        let adapter = Adapter {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            source: source.into(),
            path,
        };
        let mut all = self.adapters.write().map_err(|_| "the adapter registry is poisoned".to_string())?;
        if all.iter().any(|a| a.name == name) {
            return Err(format!("The lora adapter '{name}' has already been loaded."));
        }
        all.push(adapter.clone());
        Ok(adapter)
    }

    pub fn get(&self, name: &str) -> Option<Adapter> {
        self.adapters.read().ok()?.iter().find(|a| a.name == name).cloned()
    }

    pub fn list(&self) -> Vec<Adapter> {
        self.adapters.read().map(|a| a.clone()).unwrap_or_default()
    }

    pub fn remove(&self, name: &str) -> Option<Adapter> {
        let mut all = self.adapters.write().ok()?;
        let i = all.iter().position(|a| a.name == name)?;
        Some(all.remove(i))
    }
}

impl Adapter {
    pub fn request(&self) -> LoraRequest {
        LoraRequest { id: self.id, name: self.name.clone(), path: self.path.clone() }
    }
}

#[derive(Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadBody {
    lora_name: String,
}

/// The registry when runtime updating is on; otherwise a 404 saying how to turn it on.
fn updatable(st: &AppState) -> Result<&Arc<LoraRegistry>, ApiError> {
    match &st.info().lora {
        Some(r) if r.runtime_updates => Ok(r),
        Some(_) => Err(ApiError::NotFound(
            "runtime LoRA updating is off: start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True".into(),
        )),
        None => Err(ApiError::NotFound("LoRA is not enabled: start the server with --enable-lora".into())),
    }
}

pub(crate) async fn load(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let reg = updatable(&st)?.clone();
    let b: LoadBody = crate::routes::parse(body)?;
    if st.info().served_names.contains(&b.lora_name) {
        return Err(ApiError::BadRequest {
            message: format!("`{}` is the base model's name", b.lora_name),
            param: Some("lora_name".into()),
        });
    }
    let name = b.lora_name.clone();
    let added = tokio::task::spawn_blocking(move || reg.register(&b.lora_name, &b.lora_path))
        .await
        .map_err(|e| ApiError::Internal(format!("adapter task failed: {e}")))?;
    match added {
        Ok(a) => {
            tracing::info!("LoRA adapter `{}` (id {}) loaded from {}", a.name, a.id, a.source);
            Ok(format!("Success: LoRA adapter '{name}' added successfully."))
        }
        Err(message) => Err(ApiError::BadRequest { message, param: Some("lora_path".into()) }),
    }
}

pub(crate) async fn unload(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let reg = updatable(&st)?;
    let b: UnloadBody = crate::routes::parse(body)?;
    let Some(a) = reg.remove(&b.lora_name) else {
        return Err(ApiError::NotFound(format!("The lora adapter '{}' cannot be found.", b.lora_name)));
    };
    for e in st.engines() {
        e.retire_lora(a.id);
    }
    tracing::info!("LoRA adapter `{}` (id {}) unloaded", a.name, a.id);
    Ok(format!("Success: LoRA adapter '{}' removed successfully.", b.lora_name))
}
