//! Which files of a remote folder make the model: listed where the store can list, otherwise
//! found by their known names (`config.json`, the safetensors index or `model.safetensors`,
//! the tokenizer files) — a web server's directory listing is never assumed.

use std::collections::BTreeSet;

use object_store::GetOptions;

use crate::file::{head, FetchOptions};
use crate::store::Store;
use crate::uri::RemoteUri;
use crate::{Result, SourceError};

/// Files that are used when present (besides config.json and the weights).
pub const OPTIONAL: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
pub const INDEX: &str = "model.safetensors.index.json";

/// What a remote model folder holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One GGUF file.
    Gguf(String),
    /// A Hugging Face folder: small files, an optional index, and the safetensors shards.
    Hf { small: Vec<String>, index: Option<String>, shards: Vec<String> },
}

/// The shard names of a safetensors index (each a file in the same folder), sorted, once each.
pub fn index_shards(what: &str, text: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| SourceError::Layout(format!("{what}: not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| SourceError::Layout(format!("{what}: no `weight_map` object")))?;
    let mut out = BTreeSet::new();
    for (tensor, f) in map {
        let f = f.as_str().filter(|f| !f.is_empty() && !f.contains('/') && !f.contains("..")).ok_or_else(|| {
            SourceError::Layout(format!("{what}: weight_map[{tensor}] is not a file name in this folder"))
        })?;
        out.insert(f.to_string());
    }
    Ok(out.into_iter().collect())
}

async fn list(store: &Store, opts: &FetchOptions) -> Result<Vec<String>> {
    let s = store.store.clone();
    let prefix = store.prefix.clone();
    let metas = crate::file::retry(opts, &store.uri, store.hint, || {
        let (s, prefix) = (s.clone(), prefix.clone());
        // The folder's own files only (not every key below it).
        async move { s.list_with_delimiter(Some(&prefix)).await.map(|l| l.objects) }
    })
    .await?;
    let base = store.prefix.as_ref();
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let p = m.location.as_ref();
            let rel = if base.is_empty() { p } else { p.strip_prefix(base)?.strip_prefix('/')? };
            (!rel.contains('/') && rel != "." && rel != "..").then(|| rel.to_string())
        })
        .collect())
}

/// Whether `name` exists. For an `optional` file, a refusal counts as absent: stores served
/// over plain HTTP answer 403 for a missing key when listing is not allowed.
async fn exists(store: &Store, name: &str, opts: &FetchOptions, optional: bool) -> Result<bool> {
    match head(store, name, opts).await {
        Ok(_) => Ok(true),
        Err(SourceError::NotFound(_)) => Ok(false),
        Err(SourceError::Denied { .. }) if optional => Ok(false),
        Err(e) => Err(e),
    }
}

/// The whole of a small remote file (with retries).
async fn read_all(store: &Store, name: &str, opts: &FetchOptions) -> Result<Vec<u8>> {
    let (what, path, s) = (store.describe(name), store.path(name), store.store.clone());
    let bytes = crate::file::retry(opts, &what, store.hint, || {
        let (s, path) = (s.clone(), path.clone());
        async move { s.get_opts(&path, GetOptions::new()).await?.bytes().await }
    })
    .await?;
    Ok(bytes.to_vec())
}

/// Find the model's files (the index, when there is one, is read for its shard list).
pub async fn discover(r: &RemoteUri, store: &Store, opts: &FetchOptions) -> Result<Layout> {
    if let Some(f) = &r.file {
        return Ok(Layout::Gguf(f.clone()));
    }
    let listed = if r.can_list() { Some(list(store, opts).await?) } else { None };
    let probe = async |name: &str, optional: bool| -> Result<bool> {
        match &listed {
            Some(l) => Ok(l.iter().any(|n| n == name)),
            None => exists(store, name, opts, optional).await,
        }
    };
    let has = async |name: &str| probe(name, false).await;
    if !has("config.json").await? {
        let ggufs: Vec<&String> = listed.iter().flatten().filter(|n| n.ends_with(".gguf")).collect();
        return match (ggufs.as_slice(), &listed) {
            ([one], _) => Ok(Layout::Gguf((*one).clone())),
            (_, Some(l)) => Err(SourceError::Layout(format!(
                "{}: no config.json (and not exactly one .gguf) in this folder; it holds: [{}]",
                store.uri,
                l.join(", ")
            ))),
            (_, None) => Err(SourceError::Layout(format!(
                "{}: no config.json at {}; for a GGUF model, put the .gguf file name in the URI",
                store.uri,
                store.describe("config.json")
            ))),
        };
    }
    let mut small = vec!["config.json".to_string()];
    for name in OPTIONAL {
        if probe(name, true).await? {
            small.push(name.to_string());
        }
    }
    let (index, shards) = if has(INDEX).await? {
        let text = read_all(store, INDEX, opts).await?;
        let shards = index_shards(&store.describe(INDEX), &text)?;
        for s in &shards {
            if !has(s).await? {
                return Err(SourceError::Layout(format!(
                    "{} names shard `{s}`, which is missing: {} does not exist",
                    store.describe(INDEX),
                    store.describe(s)
                )));
            }
        }
        (Some(INDEX.to_string()), shards)
    } else {
        let shards: Vec<String> = match &listed {
            Some(l) => l.iter().filter(|n| n.ends_with(".safetensors")).cloned().collect(),
            None if has("model.safetensors").await? => vec!["model.safetensors".into()],
            None => vec![],
        };
        if shards.is_empty() {
            return Err(SourceError::Layout(format!(
                "{}: config.json but no weights (no {INDEX}, no *.safetensors)",
                store.uri
            )));
        }
        (None, shards)
    };
    Ok(Layout::Hf { small, index, shards })
}
