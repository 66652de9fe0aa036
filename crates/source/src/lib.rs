//! Model sources for Tessera: turns a model URI (`/mnt/models`, `file://`, `s3://`, `gs://`,
//! `az://`/`abfs://`, `http(s)://`, `hf://org/model[@revision]`) into a local folder the loader
//! can open, with a cache keyed by URI and revision; mirrors remote files lazily so each rank
//! downloads only the byte ranges it reads; downloads whole models (`tessera fetch`) with
//! retries, resume and checksums; and reports progress.
//!
//! Owns: URIs, object-store clients and their credentials (read from the environment), the
//! download cache, ranged reads, retries, checksums and progress.
//!
//! Must not touch: model file formats (the loader parses safetensors/GGUF and says which byte
//! ranges it needs), model math, scheduling or HTTP serving.

mod discover;
mod error;
mod fetch;
mod file;
mod progress;
mod ranges;
mod runtime;
mod store;
mod uri;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use discover::{index_shards, Layout};
pub use error::{Result, SourceError};
pub use fetch::{fetch, Fetched};
pub use file::{mirrored, FetchOptions, RemoteFile};
pub use progress::{human, Progress};
pub use store::install_tls_provider;
pub use uri::{parse, ModelUri, RemoteUri, StoreKind};

/// Where downloads go and how they are fetched.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Cache folder; a remote model lives in `cache_dir/<scheme>/<bucket or host>/<path>[/<revision>]`.
    pub cache_dir: PathBuf,
    pub fetch: FetchOptions,
    /// The part of the weights this process is expected to download (1/pods of its
    /// tensor/pipeline group), for the progress estimate of a lazy load.
    pub share: f64,
}

impl SourceOptions {
    /// `dir` if given, else `TESSERA_CACHE_DIR`, else `~/.cache/tessera/hub`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let cache_dir = dir
            .or_else(|| std::env::var_os("TESSERA_CACHE_DIR").map(PathBuf::from))
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tessera/hub")))
            .unwrap_or_else(|| PathBuf::from("/tmp/tessera-cache"));
        Self { cache_dir, fetch: FetchOptions::default(), share: 1.0 }
    }
}

/// Sidecars (held ranges) of a mirrored folder live here, out of the loader's way.
const SIDECARS: &str = ".tessera";

fn sidecar(dir: &Path, name: &str) -> PathBuf {
    dir.join(SIDECARS).join(format!("{name}.json"))
}

/// Resolved URIs of this process (every rank resolves the same URI to the same folder).
fn resolved() -> &'static Mutex<HashMap<String, PathBuf>> {
    static R: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Turn a model URI into a local path the loader opens: a local path as is; a remote model
/// as its cache folder (or GGUF file) where the small files and any GGUF are downloaded whole
/// and the safetensors shards are mirrored lazily (see [`mirrored`]).
pub fn resolve(uri: &str, opts: &SourceOptions) -> Result<PathBuf> {
    let r = match uri::parse(uri)? {
        ModelUri::Local(p) => return Ok(p),
        ModelUri::Remote(r) => r,
    };
    // One resolution at a time: ranks resolving together share the first one's files.
    static RESOLVING: Mutex<()> = Mutex::new(());
    let _one = RESOLVING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = opts.cache_dir.join(&r.cache_key);
    let key = format!("{}\u{0}{}", dir.display(), r.file.as_deref().unwrap_or(""));
    if let Some(p) = resolved().lock().ok().and_then(|m| m.get(&key).cloned()).filter(|p| p.exists()) {
        return Ok(p);
    }
    let (store, layout) = open_remote(&r, opts)?;
    let open = |name: &str| RemoteFile::open(&store, name, dir.join(name), sidecar(&dir, name), opts.fetch.clone());
    let path = match &layout {
        Layout::Gguf(name) => {
            let f = open(name)?;
            let p = Progress::start(format!("downloading {}", f.what), f.size);
            p.add(f.size - f.missing_bytes());
            f.report_to(p.clone());
            f.ensure_all()?;
            p.finish();
            dir.join(name)
        }
        Layout::Hf { small, index, shards } => {
            forget_stale_weights(&dir, index.iter().chain(shards));
            for name in small.iter().chain(index) {
                open(name)?.ensure_all()?;
            }
            let files = shards.iter().map(|n| open(n)).collect::<Result<Vec<_>>>()?;
            let total: u64 = files.iter().map(|f| f.size).sum();
            let missing: u64 = files.iter().map(|f| f.missing_bytes()).sum();
            let expected = (missing as f64 * opts.share.clamp(0.0, 1.0)) as u64;
            // Progress of the lazy reads of every rank of this process (an estimate: each
            // rank downloads only its slices, the pod the union of its ranks' slices).
            let progress = Progress::start(format!("downloading the weights of {uri} (≈ this pod's share)"), expected);
            for f in files {
                f.report_to(progress.clone());
                file::register(f);
            }
            tracing::info!(
                "{uri}: {} safetensors file(s), {} in all; each rank downloads only the byte ranges it reads (cache {})",
                shards.len(),
                human(total),
                dir.display()
            );
            dir.clone()
        }
    };
    if let Ok(mut m) = resolved().lock() {
        m.insert(key, path.clone());
    }
    Ok(path)
}

/// Remove weight files (and their sidecars) an earlier revision left in `dir` that the
/// current layout does not have: the loader would otherwise take them for part of the model.
fn forget_stale_weights<'a>(dir: &Path, keep: impl Iterator<Item = &'a String>) {
    let keep: Vec<&String> = keep.collect();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let weights = name.ends_with(".safetensors") || name == discover::INDEX;
        if weights && !keep.iter().any(|k| **k == name) {
            tracing::info!("{}: removing {name}, which the current revision does not have", dir.display());
            let _ = std::fs::remove_file(e.path());
            let _ = std::fs::remove_file(sidecar(dir, &name));
        }
    }
}

/// Whether `file` (in a folder `resolve` or `fetch` wrote) is only partly downloaded: it has a
/// sidecar that does not cover it, and no mirror in this process fills it. Reading it would
/// read holes as zeros.
pub fn incomplete_download(file: &Path) -> bool {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else { return false };
    mirrored(file).is_none() && file::sidecar_incomplete(&sidecar(dir, &name.to_string_lossy()))
}

/// The store a remote URI names and the model files it holds.
fn open_remote(r: &RemoteUri, opts: &SourceOptions) -> Result<(store::Store, Layout)> {
    let store = store::open(r)?;
    let (r, s, o) = (r.clone(), store.clone(), opts.fetch.clone());
    let layout = runtime::block_on(async move { discover::discover(&r, &s, &o).await })?;
    Ok((store, layout))
}

/// Bytes read through one reader (one rank's weight source) from remote files.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// What the reader reads (a folder or URI).
    pub what: String,
    /// Bytes the reader asked for.
    pub requested: std::sync::atomic::AtomicU64,
    /// Of those, bytes that had to be downloaded (the rest were already local).
    pub downloaded: std::sync::atomic::AtomicU64,
}

fn readers() -> &'static Mutex<Vec<Arc<ReaderStats>>> {
    static R: OnceLock<Mutex<Vec<Arc<ReaderStats>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// A new reader's counters, kept for [`reader_stats`].
pub fn new_reader(what: impl Into<String>) -> Arc<ReaderStats> {
    let s = Arc::new(ReaderStats { what: what.into(), ..Default::default() });
    if let Ok(mut r) = readers().lock() {
        r.push(s.clone());
    }
    s
}

/// Every reader of remote files in this process so far: (what, requested, downloaded).
pub fn reader_stats() -> Vec<(String, u64, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    readers()
        .lock()
        .map(|r| r.iter().map(|s| (s.what.clone(), s.requested.load(Relaxed), s.downloaded.load(Relaxed))).collect())
        .unwrap_or_default()
}
