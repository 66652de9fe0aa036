//! LoRA flags (`--enable-lora`, `--lora-modules`, `--max-loras`, `--max-lora-rank`,
//! `--max-cpu-loras`) → the server's adapter registry, whose check resolves an adapter's
//! source like a model URI and verifies it against the served model.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};
use tessera_models::ModelConfig;
use tessera_server::LoraRegistry;

use crate::args::ServeArgs;
use crate::ServeError;

/// One `--lora-modules` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraModule {
    pub name: String,
    /// A directory or model URI (`s3://…`, `hf://…`, …).
    pub path: String,
}

/// `name=path`, or vLLM's JSON form `{"name": …, "path": …, "base_model_name": …}`.
pub fn parse_module(s: &str) -> Result<LoraModule, String> {
    let t = s.trim();
    if t.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(t).map_err(|e| format!("`{s}`: {e}"))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        return match (field("name"), field("path")) {
            (Some(name), Some(path)) if !name.is_empty() && !path.is_empty() => Ok(LoraModule { name, path }),
            _ => Err(format!("`{s}`: the JSON form needs \"name\" and \"path\"")),
        };
    }
    match t.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok(LoraModule { name: name.into(), path: path.into() })
        }
        _ => Err(format!("`{s}`: expected name=path or {{\"name\": …, \"path\": …}}")),
    }
}

/// Every adapter the flags name (`--lora-modules`, then `TESSERA_LORA_MODULES`).
fn modules(a: &ServeArgs) -> impl Iterator<Item = &LoraModule> {
    a.lora_modules.iter().chain(&a.lora_modules_env)
}

/// The names of the adapters the flags serve.
pub(crate) fn module_names(a: &ServeArgs) -> Vec<String> {
    modules(a).map(|m| m.name.clone()).collect()
}

/// Whether `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are served (vLLM's switch).
fn runtime_updates() -> bool {
    ["VLLM_ALLOW_RUNTIME_LORA_UPDATING", "TESSERA_ALLOW_RUNTIME_LORA_UPDATING"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .any(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// The flags' consistency.
pub(crate) fn validate(a: &ServeArgs) -> Result<(), ServeError> {
    let bad = |m: String| Err(ServeError::Config(m));
    if !a.enable_lora {
        return match modules(a).next().is_none() {
            true => Ok(()),
            false => bad("--lora-modules needs --enable-lora".into()),
        };
    }
    if a.max_loras == 0 || a.max_lora_rank == 0 {
        return bad("--max-loras and --max-lora-rank must be at least 1".into());
    }
    if a.max_cpu_loras.is_some_and(|c| c < a.max_loras) {
        return bad(format!("--max-cpu-loras ({:?}) must be at least --max-loras ({})", a.max_cpu_loras, a.max_loras));
    }
    let mut names: Vec<&str> = modules(a).map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return bad(format!("--lora-modules names `{}` twice", w[0]));
    }
    Ok(())
}

/// Adapters kept loaded on the ranks.
pub(crate) fn resident(a: &ServeArgs) -> usize {
    a.max_cpu_loras.unwrap_or(a.max_loras).max(a.max_loras)
}

/// The registry (with `--enable-lora`): its check resolves a source into the download folder
/// and loads the adapter once against `cfg`, set once the model is loaded.
pub(crate) fn registry(a: &ServeArgs, cfg: Arc<OnceLock<ModelConfig>>) -> Option<Arc<LoraRegistry>> {
    if !a.enable_lora {
        return None;
    }
    let (max_rank, download_dir) = (a.max_lora_rank, a.download_dir.clone());
    // Ranks (LeaderWorkerSet) or replicas on other pods open an adapter by the path this pod
    // gives them: only a local path, which every pod has (the operator mounts /mnt/lora on
    // each), can be shared; a download would land on this pod only.
    let spans_pods = crate::ranks::Topology::placement().is_ok_and(|p| p.0 > 1) || crate::dp::multi_pod(a);
    let check = move |name: &str, source: &str| -> Result<std::path::PathBuf, String> {
        let cfg = cfg.get().ok_or("the model is still loading")?;
        let remote = source.contains("://") && !source.starts_with("file://");
        if spans_pods && remote {
            return Err(format!(
                "adapter `{name}`: {source} would be downloaded on this pod only, but ranks or replicas run on other \
                 pods; give a path every pod has (the operator mounts adapters under /mnt/lora on each)"
            ));
        }
        let opts = tessera_source::SourceOptions::new(download_dir.clone());
        let dir = tessera_source::resolve(source, &opts).map_err(|e| format!("adapter `{name}`: {e}"))?;
        let peft = tessera_loader::PeftAdapter::open(&dir, DType::F32, &Device::Cpu)
            .map_err(|e| format!("adapter `{name}`: {e}"))?;
        if peft.config.rank > max_rank {
            return Err(format!(
                "adapter `{name}` has rank {} but --max-lora-rank is {max_rank}; raise --max-lora-rank",
                peft.config.rank
            ));
        }
        tessera_models::check_lora(name, cfg, peft.config.clone(), &peft).map_err(|e| e.to_string())?;
        tracing::info!(
            "LoRA adapter `{name}`: rank {}, alpha {}, from {}",
            peft.config.rank,
            peft.config.alpha,
            dir.display()
        );
        Ok(dir)
    };
    Some(Arc::new(LoraRegistry::new(Arc::new(check), a.max_loras, runtime_updates())))
}

/// Register every `--lora-modules` entry (blocking); the first that does not fit fails start-up.
pub(crate) fn register_modules(a: &ServeArgs, reg: &LoraRegistry) -> Result<(), ServeError> {
    for m in modules(a) {
        if a.served_model_name.contains(&m.name) {
            return Err(ServeError::Config(format!("--lora-modules: `{}` is the base model's name", m.name)));
        }
        let added = reg.register(&m.name, &m.path).map_err(|e| ServeError::Config(format!("--lora-modules: {e}")))?;
        tracing::info!("LoRA adapter `{}` served from {}", added.name, m.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_parse_in_both_forms_and_bad_ones_say_why() {
        assert_eq!(
            parse_module("sql=/mnt/lora/sql").unwrap(),
            LoraModule { name: "sql".into(), path: "/mnt/lora/sql".into() }
        );
        let j = parse_module(r#"{"name": "sql", "path": "s3://b/sql", "base_model_name": "m"}"#).unwrap();
        assert_eq!(j, LoraModule { name: "sql".into(), path: "s3://b/sql".into() });
        for bad in ["sql", "=x", "sql=", r#"{"name": "sql"}"#, "{nope"] {
            assert!(parse_module(bad).unwrap_err().contains(bad), "{bad}");
        }
    }
}
