//! One remote file mirrored into a local file: sparse until every byte is there, with a sidecar
//! that records which ranges are held, so a restart or a second rank never downloads a byte
//! twice. Missing ranges are fetched with concurrent ranged GETs and bounded retries.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use object_store::{GetOptions, ObjectMeta};
use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use crate::ranges::{coalesce, split, RangeSet};
use crate::store::{classify, Failure, Store};
use crate::{Result, SourceError};

/// How remote bytes are fetched.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Ranged GETs in flight at once.
    pub concurrency: usize,
    /// Largest single GET.
    pub chunk: u64,
    /// Attempts per GET before giving up (transient failures only).
    pub attempts: u32,
    /// First back-off between attempts (doubles, at most 5 s).
    pub backoff: Duration,
    /// Wanted ranges closer than this are fetched as one GET (`TESSERA_RANGE_MERGE_GAP`,
    /// default 256 bytes). A column shard is one run per row, so the default keeps a rank's
    /// download to its own bytes at the price of one GET per row; on a store with high
    /// per-request latency a gap of a few MiB trades bytes for far fewer requests.
    pub merge_gap: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        let merge_gap = std::env::var("TESSERA_RANGE_MERGE_GAP").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
        Self { concurrency: 16, chunk: 16 << 20, attempts: 5, backoff: Duration::from_millis(200), merge_gap }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Sidecar {
    uri: String,
    size: u64,
    etag: Option<String>,
    held: RangeSet,
}

/// A remote file and its local copy.
pub struct RemoteFile {
    /// `URI/name`, for messages.
    pub what: String,
    /// Bytes in the remote file.
    pub size: u64,
    /// The store's ETag (an MD5 or SHA-256 of the content for many stores).
    pub etag: Option<String>,
    /// The local copy (full size; holes until fetched).
    pub local: PathBuf,
    store: Store,
    location: object_store::path::Path,
    sidecar: PathBuf,
    opts: FetchOptions,
    state: Mutex<(Arc<File>, RangeSet)>,
    progress: Mutex<Option<Arc<Progress>>>,
}

/// Run `call` with bounded retries: permanent failures end at once.
pub(crate) async fn retry<T, F, Fut>(opts: &FetchOptions, what: &str, hint: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut wait = opts.backoff;
    let mut last = String::new();
    for attempt in 1..=opts.attempts.max(1) {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => match classify(e, what, hint) {
                Failure::Permanent(e) => return Err(e),
                Failure::Transient(why) => {
                    if attempt < opts.attempts {
                        tracing::warn!(
                            "{what}: {why}; retrying in {:.1}s (attempt {attempt} of {})",
                            wait.as_secs_f64(),
                            opts.attempts
                        );
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                    last = why;
                }
            },
        }
    }
    Err(SourceError::GaveUp { what: what.into(), attempts: opts.attempts.max(1), last })
}

/// HEAD a remote file (with retries).
pub(crate) async fn head(store: &Store, name: &str, opts: &FetchOptions) -> Result<ObjectMeta> {
    let (what, path) = (store.describe(name), store.path(name));
    let s = store.store.clone();
    retry(opts, &what, store.hint, || {
        let (s, path) = (s.clone(), path.clone());
        async move { s.get_opts(&path, GetOptions::new().with_head(true)).await.map(|r| r.meta) }
    })
    .await
}

fn save(path: &Path, side: &Sidecar) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let text =
        serde_json::to_vec(side).map_err(|e| SourceError::Store { what: side.uri.clone(), detail: e.to_string() })?;
    std::fs::write(&tmp, text).map_err(|e| SourceError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SourceError::io(path, e))
}

/// Whether a sidecar exists and says its file is not complete (unreadable counts as not).
pub(crate) fn sidecar_incomplete(p: &Path) -> bool {
    match read_sidecar(p) {
        Some(s) => !s.held.normalized(s.size).covers(s.size),
        None => p.exists(),
    }
}

fn read_sidecar(p: &Path) -> Option<Sidecar> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

impl RemoteFile {
    /// Mirror `name` of `store` into `local` (sidecar at `sidecar`), reusing what an earlier run
    /// left there if the remote file is unchanged (same size and ETag).
    pub(crate) fn open(
        store: &Store,
        name: &str,
        local: PathBuf,
        sidecar: PathBuf,
        opts: FetchOptions,
    ) -> Result<Arc<Self>> {
        if let Some(f) = mirrored(&local) {
            return Ok(f);
        }
        let what = store.describe(name);
        let old = read_sidecar(&sidecar);
        let meta = {
            let (store, name, o) = (store.clone(), name.to_string(), opts.clone());
            crate::runtime::block_on(async move { head(&store, &name, &o).await })
        };
        let (size, etag) = match (meta, &old) {
            (Ok(m), _) => (m.size, m.e_tag),
            // Offline restart: a complete copy is still good.
            (Err(e @ SourceError::GaveUp { .. }), Some(old)) if old.held.covers(old.size) && local.is_file() => {
                tracing::warn!("{e}; using the complete cached copy {}", local.display());
                (old.size, old.etag.clone())
            }
            (Err(e), _) => return Err(e),
        };
        // Reuse what an earlier run holds only if the remote file is unchanged and the local
        // copy still has its full length (a truncated copy would read as zeros).
        let local_len = std::fs::metadata(&local).map(|m| m.len()).ok();
        let held = match old {
            Some(o) if o.size == size && o.etag == etag && local_len == Some(size) => o.held.normalized(size),
            _ => RangeSet::default(),
        };
        for dir in [local.parent(), sidecar.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir).map_err(|e| SourceError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&local)
            .map_err(|e| SourceError::io(&local, e))?;
        if held.held() == 0 {
            file.set_len(0).map_err(|e| SourceError::io(&local, e))?;
        }
        file.set_len(size).map_err(|e| SourceError::io(&local, e))?;
        let f = Arc::new(Self {
            what,
            size,
            etag,
            local,
            store: store.clone(),
            location: store.path(name),
            sidecar,
            opts,
            state: Mutex::new((Arc::new(file), held)),
            progress: Mutex::new(None),
        });
        if let Ok(state) = f.state.lock() {
            f.save_held(&state.1)?;
        }
        Ok(f)
    }

    /// Report fetched bytes to `p` from now on.
    pub fn report_to(&self, p: Arc<Progress>) {
        if let Ok(mut g) = self.progress.lock() {
            *g = Some(p);
        }
    }

    /// Bytes not yet local.
    pub fn missing_bytes(&self) -> u64 {
        self.state.lock().map(|s| self.size - s.1.held().min(self.size)).unwrap_or(self.size)
    }

    /// Make every byte of `ranges` local; returns the bytes downloaded for it. Ranges past
    /// the end of the file are an error naming the file.
    pub fn ensure(&self, ranges: &[Range<u64>]) -> Result<u64> {
        if let Some(r) = ranges.iter().find(|r| r.end > self.size) {
            return Err(SourceError::Integrity(format!(
                "{}: bytes {}..{} asked for, but the file holds {} bytes (truncated?)",
                self.what, r.start, r.end, self.size
            )));
        }
        let mut state = self
            .state
            .lock()
            .map_err(|_| SourceError::Store { what: self.what.clone(), detail: "an earlier fetch panicked".into() })?;
        let missing: Vec<Range<u64>> = ranges.iter().flat_map(|r| state.1.missing(r.clone())).collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let pieces = split(&coalesce(missing, self.opts.merge_gap), self.opts.chunk);
        let file = state.0.clone();
        let progress = self.progress.lock().ok().and_then(|p| p.clone());
        let (store, location, what, opts) =
            (self.store.clone(), self.location.clone(), self.what.clone(), self.opts.clone());
        let etag = self.etag.clone();
        let mut side =
            Sidecar { uri: self.what.clone(), size: self.size, etag: self.etag.clone(), held: state.1.clone() };
        let path = self.sidecar.clone();
        // The caller holds the state lock while this runs, so sidecar writes never race.
        let (side, got, first_err) = crate::runtime::block_on(async move {
            let fetches = pieces.into_iter().map(|r| {
                let (store, location, what, opts, file, progress, etag) = (
                    store.clone(),
                    location.clone(),
                    what.clone(),
                    opts.clone(),
                    file.clone(),
                    progress.clone(),
                    etag.clone(),
                );
                async move {
                    let got =
                        fetch_range(&store, &location, &what, &opts, r.clone(), etag.clone()).await.and_then(|bytes| {
                            file.write_all_at(&bytes, r.start)
                                .map_err(|e| SourceError::Io { path: what.clone(), source: e })?;
                            if let Some(p) = &progress {
                                p.add(bytes.len() as u64);
                            }
                            Ok(())
                        });
                    (r, got)
                }
            });
            let mut done = futures::stream::iter(fetches).buffer_unordered(opts.concurrency.max(1));
            let (mut got, mut first_err, mut saved) = (0, None, std::time::Instant::now());
            while let Some((r, res)) = done.next().await {
                match res {
                    Ok(()) => {
                        got += r.end - r.start;
                        side.held.insert(r);
                        // Persist progress now and then, so a crash resumes from here.
                        if saved.elapsed() > Duration::from_millis(500) {
                            file.sync_data().map_err(|e| SourceError::io(&path, e))?;
                            save(&path, &side)?;
                            saved = std::time::Instant::now();
                        }
                    }
                    Err(e) => {
                        // Stop at the first piece that failed for good: the rest would only
                        // retry against the same failure.
                        first_err = Some(e);
                        break;
                    }
                }
            }
            Ok((side, got, first_err))
        })?;
        state.0.sync_data().map_err(|e| SourceError::io(&self.local, e))?;
        save(&self.sidecar, &side)?;
        state.1 = side.held;
        match first_err {
            Some(SourceError::RangesUnsupported(_)) => {
                tracing::warn!(
                    "{}: the server does not serve byte ranges (a ranged GET was answered with the whole file); \
                     downloading the whole file ({} bytes) once instead",
                    self.what,
                    self.size
                );
                let whole = self.download_whole(&state.0)?;
                state.1 = RangeSet::default();
                state.1.insert(0..self.size);
                self.save_held(&state.1)?;
                Ok(got + whole)
            }
            Some(e) => Err(e),
            None => Ok(got),
        }
    }

    /// Record in the sidecar that `held` is local.
    fn save_held(&self, held: &RangeSet) -> Result<()> {
        let side = Sidecar { uri: self.what.clone(), size: self.size, etag: self.etag.clone(), held: held.clone() };
        save(&self.sidecar, &side)
    }

    /// One streamed GET of the whole file into `file`, retried from the start on transient
    /// failures; the length must be the size the HEAD promised.
    fn download_whole(&self, file: &Arc<File>) -> Result<u64> {
        let (store, location, what, opts, etag) =
            (self.store.clone(), self.location.clone(), self.what.clone(), self.opts.clone(), self.etag.clone());
        let progress = self.progress.lock().ok().and_then(|p| p.clone());
        let (dst, size) = (file.clone(), self.size);
        let got = crate::runtime::block_on(async move {
            retry(&opts, &what, store.hint, || {
                let (s, location, file, progress) =
                    (store.store.clone(), location.clone(), dst.clone(), progress.clone());
                let o = GetOptions { if_match: etag.clone(), ..GetOptions::new() };
                async move {
                    let mut stream = s.get_opts(&location, o).await?.into_stream();
                    let mut at = 0u64;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk?;
                        file.write_all_at(&chunk, at)
                            .map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
                        at += chunk.len() as u64;
                        if let Some(p) = &progress {
                            p.add(chunk.len() as u64);
                        }
                    }
                    Ok(at)
                }
            })
            .await
        })?;
        if got != size {
            return Err(SourceError::Integrity(format!(
                "{}: the server sent {got} bytes for the whole file instead of {size}",
                self.what
            )));
        }
        file.sync_data().map_err(|e| SourceError::io(&self.local, e))?;
        Ok(got)
    }

    /// Make the whole file local.
    pub fn ensure_all(&self) -> Result<u64> {
        self.ensure(std::slice::from_ref(&(0..self.size)))
    }
}

async fn fetch_range(
    store: &Store,
    location: &object_store::path::Path,
    what: &str,
    opts: &FetchOptions,
    r: Range<u64>,
    etag: Option<String>,
) -> Result<bytes::Bytes> {
    let what_r = format!("{what} (bytes {}..{})", r.start, r.end);
    let s = store.store.clone();
    let bytes = retry(opts, &what_r, store.hint, || {
        let (s, location, r) = (s.clone(), location.clone(), r.clone());
        let o = GetOptions { if_match: etag.clone(), ..GetOptions::new().with_range(Some(r)) };
        async move { s.get_opts(&location, o).await?.bytes().await }
    })
    .await?;
    if bytes.len() as u64 != r.end - r.start {
        return Err(SourceError::Integrity(format!(
            "{what_r}: the server sent {} bytes instead of {}",
            bytes.len(),
            r.end - r.start
        )));
    }
    Ok(bytes)
}

/// Remote files mirrored by this process, by local path, so every rank shares one copy.
fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<RemoteFile>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Arc<RemoteFile>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

pub(crate) fn register(f: Arc<RemoteFile>) {
    registry().lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(f.local.clone(), f);
}

/// The remote file whose local copy is `local`, if this process mirrors one there: readers
/// must `ensure` the byte ranges they read.
pub fn mirrored(local: &Path) -> Option<Arc<RemoteFile>> {
    registry().lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(local).cloned()
}
