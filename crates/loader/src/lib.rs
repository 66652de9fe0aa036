//! Model loading for Tessera: finds what a model path holds (Hugging Face directory or GGUF
//! file), reads its config, weights and tokenizer, and can derive a Hugging Face-layout copy
//! of a GGUF model.
//!
//! Owns: file formats (safetensors, GGUF, `config.json`, `tokenizer*.json`,
//! `generation_config.json`, PEFT adapters) and their errors, which always name the file / tensor / field.
//!
//! Must not touch: model math (that is `tessera-models`, reached only through
//! `WeightSource`), scheduling, HTTP, or environment variables.

mod encoder;
mod error;
mod export;
mod gguf;
mod header;
mod hf;
mod peft;
mod spm;
mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tessera_models::{ModelConfig, WeightSource};

pub use encoder::{open_encoder, EncoderModel};
pub use error::{LoadError, Result};
pub use export::export_hf;
pub use gguf::GgufSource;
pub use hf::SafetensorsSource;
pub use peft::PeftAdapter;
pub use tokenizer::{GenerationDefaults, TokenizerBundle};

/// What a model path turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// A Hugging Face directory (`config.json` + safetensors).
    HfDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

/// Decide the format of a local model path: a `.gguf` file, a directory with `config.json`,
/// or a directory holding exactly one `.gguf` file.
pub fn detect(path: &Path) -> Result<ModelFormat> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.display().to_string()));
    }
    if path.is_file() {
        return if path.extension().is_some_and(|e| e == "gguf") {
            Ok(ModelFormat::Gguf(path.to_path_buf()))
        } else {
            Err(LoadError::Format(format!(
                "{}: a model file must be a .gguf; otherwise pass a directory with config.json",
                path.display()
            )))
        };
    }
    if path.join("config.json").is_file() {
        return Ok(ModelFormat::HfDir(path.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| LoadError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(ModelFormat::Gguf(one.clone())),
        [] => Err(LoadError::Format(format!("{}: no config.json and no .gguf file in this directory", path.display()))),
        _ => Err(LoadError::Format(format!("{}: several .gguf files; pass one of them", path.display()))),
    }
}

/// Everything needed to build and serve a model, before the model itself is built.
pub struct LoadedModel {
    pub format: ModelFormat,
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: TokenizerBundle,
}

/// Open a local model path: config, weight source and tokenizer.
pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let format = detect(path)?;
    match &format {
        ModelFormat::HfDir(dir) => {
            let config = hf::read_config(dir)?;
            let weights = SafetensorsSource::open(dir, dtype, device)?;
            let tokenizer = TokenizerBundle::from_hf_dir(dir, &config)?;
            Ok(LoadedModel { format, config, weights: Box::new(weights), tokenizer })
        }
        ModelFormat::Gguf(file) => {
            let src = GgufSource::open(file, dtype, device)?;
            let config = src.config().clone();
            let tokenizer = TokenizerBundle::from_gguf(src.content(), file)?;
            Ok(LoadedModel { format, config, weights: Box::new(src), tokenizer })
        }
    }
}
