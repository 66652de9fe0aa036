//! Hugging Face directories: `config.json` and safetensors weights (single file or sharded
//! with `model.safetensors.index.json`), memory-mapped.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use tessera_models::{shard_byte_runs, ModelConfig, ModelError, Shard, Weight, WeightSource};

use tessera_source::{human, ReaderStats, RemoteFile};

use crate::header::{self, TensorSpan};
use crate::{LoadError, Result};

/// Read and validate `config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| LoadError::io(&p, e))?;
    ModelConfig::from_hf_json(&text).map_err(|e| LoadError::Format(format!("{}: {e}", p.display())))
}

/// The safetensors files of a directory: those named by the index, or every `*.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read(&index).map_err(|e| LoadError::io(&index, e))?;
        let files = tessera_source::index_shards(&index.display().to_string(), &text)?;
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(LoadError::Format(format!(
                    "{}: names shard `{f}`, which is missing from {}",
                    index.display(),
                    dir.display()
                )));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(LoadError::Format(format!("{}: no *.safetensors files", dir.display())));
    }
    Ok(out)
}

/// Memory-mapped safetensors weights, converted to the model dtype on read. Files mirrored
/// from a remote store (see `tessera_source::mirrored`) are sparse: the byte ranges of each
/// tensor (or shard of it) are downloaded just before they are read.
pub struct SafetensorsSource {
    st: MmapedSafetensors,
    dtype: DType,
    device: Device,
    dir: PathBuf,
    spans: HashMap<String, TensorSpan>,
    files: Vec<std::fs::File>,
    remote: Vec<Option<Arc<RemoteFile>>>,
    reader: Option<(Arc<ReaderStats>, Instant)>,
}

/// Read `range` of `file` (after making it local when the file is mirrored).
fn read_at(path: &Path, remote: Option<&RemoteFile>, range: Range<u64>) -> Result<Vec<u8>> {
    if let Some(r) = remote {
        r.ensure(std::slice::from_ref(&range))?;
    }
    let f = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    f.read_exact_at(&mut buf, range.start).map_err(|e| LoadError::io(path, e))?;
    Ok(buf)
}

/// Check a file's header and return its tensors' absolute spans.
fn spans_of(path: &Path, index: usize, remote: Option<&RemoteFile>) -> Result<HashMap<String, TensorSpan>> {
    let what = remote.map_or_else(|| path.display().to_string(), |r| r.what.clone());
    let len = match remote {
        Some(r) => r.size,
        None => std::fs::metadata(path).map_err(|e| LoadError::io(path, e))?.len(),
    };
    if len < 8 {
        return Err(LoadError::Format(format!("{what}: {len} bytes is too short for a safetensors file")));
    }
    let first: [u8; 8] = read_at(path, remote, 0..8)?.try_into().unwrap_or_default();
    let n = header::header_len(&what, first, len)?;
    header::parse(&what, index, &read_at(path, remote, 8..8 + n)?, len)
}

impl SafetensorsSource {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = weight_files(dir)?;
        if let Some(f) = files.iter().find(|f| tessera_source::incomplete_download(f)) {
            return Err(LoadError::Format(format!(
                "{}: only partly downloaded (an interrupted `tessera fetch`?); fetch it again",
                f.display()
            )));
        }
        let remote: Vec<Option<Arc<RemoteFile>>> = files.iter().map(|f| tessera_source::mirrored(f)).collect();
        let mut spans = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            spans.extend(spans_of(f, i, remote[i].as_deref())?);
        }
        // SAFETY: the files are mapped read-only; Tessera never writes to a model directory
        // while serving it, except to fill the holes of a mirrored file — and those bytes are
        // written before they are read, never changed after. A concurrent external writer is
        // outside the supported use.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| LoadError::candle(format!("{}: reading safetensors", dir.display()), e))?;
        let reader = remote
            .iter()
            .any(Option::is_some)
            .then(|| (tessera_source::new_reader(dir.display().to_string()), Instant::now()));
        let files =
            files.iter().map(|f| std::fs::File::open(f).map_err(|e| LoadError::io(f, e))).collect::<Result<_>>()?;
        Ok(Self { st, dtype, device: device.clone(), dir: dir.to_path_buf(), spans, files, remote, reader })
    }

    /// Make the bytes at `runs` (relative to the tensor's data) local, if its file is mirrored.
    fn make_local(&self, name: &str, runs: &[Range<usize>]) -> tessera_models::Result<()> {
        let Some(span) = self.spans.get(name) else {
            return match self.remote.iter().any(Option::is_some) {
                true => Err(ModelError::Source(format!("tensor {name}: not in any checked safetensors header"))),
                false => Ok(()),
            };
        };
        let Some(Some(remote)) = self.remote.get(span.file) else { return Ok(()) };
        let abs: Vec<Range<u64>> =
            runs.iter().map(|r| span.bytes.start + r.start as u64..span.bytes.start + r.end as u64).collect();
        let got = remote.ensure(&abs).map_err(|e| ModelError::Source(format!("tensor {name}: {e}")))?;
        if let Some((stats, _)) = &self.reader {
            stats.requested.fetch_add(abs.iter().map(|r| r.end - r.start).sum(), Relaxed);
            stats.downloaded.fetch_add(got, Relaxed);
        }
        Ok(())
    }
}

impl SafetensorsSource {
    /// The bytes at `runs` (relative to the tensor's data), concatenated: downloaded first
    /// when the file is mirrored, then read with positioned reads (large sequential reads
    /// beat page faults through the map on a cold cache).
    fn read_runs(&self, name: &str, runs: &[Range<usize>]) -> tessera_models::Result<Vec<u8>> {
        let fail = |e: String| ModelError::Source(format!("{}: tensor {name}: {e}", self.dir.display()));
        self.make_local(name, runs)?;
        let span = self.spans.get(name).ok_or_else(|| fail("not in any checked header".into()))?;
        let file = self.files.get(span.file).ok_or_else(|| fail("no such file".into()))?;
        let at = |r: &Range<usize>| span.bytes.start + r.start as u64;
        let mut out = vec![0u8; runs.iter().map(|r| r.len()).sum()];
        match (runs.first(), runs.last()) {
            // Many small runs (a column shard): one read of the span they cover.
            (Some(first), Some(last)) if runs.len() > 64 => {
                let mut cover = vec![0u8; last.end - first.start];
                file.read_exact_at(&mut cover, at(first)).map_err(|e| fail(e.to_string()))?;
                let mut o = 0;
                for r in runs {
                    out[o..o + r.len()].copy_from_slice(&cover[r.start - first.start..r.end - first.start]);
                    o += r.len();
                }
            }
            _ => {
                let mut o = 0;
                for r in runs {
                    file.read_exact_at(&mut out[o..o + r.len()], at(r)).map_err(|e| fail(e.to_string()))?;
                    o += r.len();
                }
            }
        }
        Ok(out)
    }
}

impl Drop for SafetensorsSource {
    fn drop(&mut self) {
        if let Some((stats, t0)) = &self.reader {
            let (req, got) = (stats.requested.load(Relaxed), stats.downloaded.load(Relaxed));
            if req > 0 {
                let secs = t0.elapsed().as_secs_f64();
                tracing::info!(
                    "weights read from the remote copy in {}: {} for this rank ({} downloaded, the rest already local) in {secs:.1}s ({:.2} GB/s)",
                    self.dir.display(),
                    human(req),
                    human(got),
                    req as f64 / secs.max(1e-6) / 1e9
                );
            }
        }
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: &str) -> tessera_models::Result<Weight> {
        if !self.contains(name) {
            return Err(ModelError::MissingWeight(format!("{name} (in {})", self.dir.display())));
        }
        let where_ = || format!("{}: tensor {name}", self.dir.display());
        let view = self.st.get(name).map_err(|e| ModelError::Source(format!("{}: {e}", where_())))?;
        let (Some(span), Ok(dtype)) = (self.spans.get(name), DType::try_from(view.dtype())) else {
            let t = self.st.load(name, &self.device).and_then(|t| t.to_dtype(self.dtype));
            return Ok(Weight::Dense(t.map_err(|e| ModelError::Source(format!("{}: {e}", where_())))?));
        };
        let whole = 0..(span.bytes.end - span.bytes.start) as usize;
        let bytes = self.read_runs(name, std::slice::from_ref(&whole))?;
        let t = candle_core::Tensor::from_raw_buffer(&bytes, dtype, view.shape(), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| ModelError::Source(format!("{}: {e}", where_())))?;
        Ok(Weight::Dense(t))
    }

    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Reads only the shard's bytes: whole rows for `dim` 0, a run of each row for `dim` 1 —
    /// the rest of the file is never touched (or downloaded) by this rank.
    fn get_shard(&self, name: &str, full: &[usize], shard: Shard) -> tessera_models::Result<Weight> {
        if shard.is_full() || shard.dim > 1 || full.len() > 2 || (shard.dim == 1 && full.len() != 2) {
            return tessera_models::WeightSource::get_shard_by_narrowing(self, name, full, shard);
        }
        let where_ = || format!("{}: tensor {name}", self.dir.display());
        let view =
            self.st.get(name).map_err(|_| ModelError::MissingWeight(format!("{name} (in {})", self.dir.display())))?;
        if view.shape() != full {
            return Err(ModelError::Shape { name: name.into(), got: view.shape().to_vec(), expected: full.to_vec() });
        }
        let dtype = DType::try_from(view.dtype()).map_err(|e| ModelError::Source(format!("{}: {e}", where_())))?;
        let matrix = [full[0], full.get(1).copied().unwrap_or(1)];
        let runs = shard_byte_runs(matrix, (1, dtype.size_in_bytes()), shard.dim, shard.range(full[shard.dim]));
        let (runs, shape) = runs.ok_or_else(|| ModelError::Source(format!("{}: cannot cut {shard:?}", where_())))?;
        let shape = &shape[..full.len()];
        let bytes = self.read_runs(name, &runs)?;
        let t = candle_core::Tensor::from_raw_buffer(&bytes, dtype, shape, &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| ModelError::Source(format!("{}: {e}", where_())))?;
        Ok(Weight::Dense(t))
    }
}
