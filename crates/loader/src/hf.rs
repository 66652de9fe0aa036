//! Hugging Face directories: `config.json` and safetensors weights (single file or sharded
//! with `model.safetensors.index.json`), memory-mapped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use tessera_models::{shard_byte_runs, ModelConfig, ModelError, Shard, Weight, WeightSource};

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
        let text = std::fs::read_to_string(&index).map_err(|e| LoadError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LoadError::Format(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Format(format!("{}: no `weight_map` object", index.display())))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let f = file.as_str().ok_or_else(|| {
                LoadError::Format(format!("{}: weight_map[{tensor}] is not a string", index.display()))
            })?;
            if f.contains('/') || f.contains("..") {
                return Err(LoadError::Format(format!(
                    "{}: shard name `{f}` for {tensor} must be a file in the same directory",
                    index.display()
                )));
            }
            files.insert(f.to_string());
        }
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

/// Memory-mapped safetensors weights, converted to the model dtype on read.
pub struct SafetensorsSource {
    st: MmapedSafetensors,
    dtype: DType,
    device: Device,
    dir: PathBuf,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = weight_files(dir)?;
        // SAFETY: the files are mapped read-only; Tessera never writes to a model directory
        // while serving it. A concurrent external writer is outside the supported use.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| LoadError::candle(format!("{}: reading safetensors", dir.display()), e))?;
        Ok(Self { st, dtype, device: device.clone(), dir: dir.to_path_buf() })
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: &str) -> tessera_models::Result<Weight> {
        if !self.contains(name) {
            return Err(ModelError::MissingWeight(format!("{name} (in {})", self.dir.display())));
        }
        let t = self
            .st
            .load(name, &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| ModelError::Source(format!("{}: tensor {name}: {e}", self.dir.display())))?;
        Ok(Weight::Dense(t))
    }

    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Copies only the shard's bytes out of the memory map: whole rows for `dim` 0, a run of
    /// each row for `dim` 1 — the rest of the file is never touched by this rank.
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
        let data = view.data();
        let matrix = [full[0], full.get(1).copied().unwrap_or(1)];
        let runs = shard_byte_runs(matrix, (1, dtype.size_in_bytes()), shard.dim, shard.range(full[shard.dim]));
        let (runs, shape) = runs.ok_or_else(|| ModelError::Source(format!("{}: cannot cut {shard:?}", where_())))?;
        let shape = &shape[..full.len()];
        let mut bytes = Vec::with_capacity(runs.iter().map(|r| r.len()).sum());
        for r in runs {
            let run =
                data.get(r).ok_or_else(|| ModelError::Source(format!("{}: data shorter than its shape", where_())))?;
            bytes.extend_from_slice(run);
        }
        let t = candle_core::Tensor::from_raw_buffer(&bytes, dtype, shape, &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| ModelError::Source(format!("{}: {e}", where_())))?;
        Ok(Weight::Dense(t))
    }
}
