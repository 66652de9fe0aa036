//! Embedding models: a sentence-transformers folder (`config.json` of a BERT, the weights in
//! safetensors, `tokenizer.json`, `modules.json` naming the pooling and normalisation,
//! `1_Pooling/config.json`, `sentence_bert_config.json`'s `max_seq_length`).

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::Value;
use tessera_models::{Bert, BertConfig, Pooling};
use tokenizers::Tokenizer;

use crate::{LoadError, Result, SafetensorsSource};

/// An encoder ready to embed.
pub struct EncoderModel {
    pub model: Bert,
    /// Without the file's own truncation and padding: inputs are checked against `max_tokens`.
    pub tokenizer: Tokenizer,
    pub pooling: Pooling,
    /// L2-normalise the pooled vector (a `Normalize` module).
    pub normalize: bool,
    /// The longest input in tokens (special tokens included).
    pub max_tokens: usize,
}

fn json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let p = dir.join(name);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| LoadError::io(&p, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| LoadError::Format(format!("{}: {e}", p.display())))
}

/// Open the encoder in `dir`.
pub fn open_encoder(dir: &Path, dtype: DType, device: &Device) -> Result<EncoderModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| LoadError::io(&cfg_path, e))?;
    let cfg = BertConfig::from_hf_json(&text)?;
    let weights = SafetensorsSource::open(dir, dtype, device)?;
    let model = Bert::load(&cfg, &weights, dtype, device)?;
    let tp = dir.join("tokenizer.json");
    let mut tokenizer = Tokenizer::from_file(&tp).map_err(|e| LoadError::Format(format!("{}: {e}", tp.display())))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| LoadError::Format(format!("{}: {e}", tp.display())))?;
    let modules = json(dir, "modules.json")?.unwrap_or(Value::Null);
    let has = |kind: &str| {
        modules.as_array().is_some_and(|m| m.iter().any(|x| x["type"].as_str().is_some_and(|t| t.ends_with(kind))))
    };
    let pooling = match json(dir, "1_Pooling/config.json")? {
        Some(p) if p["pooling_mode_cls_token"] == true => Pooling::Cls,
        Some(p) if p["pooling_mode_max_tokens"] == true => Pooling::Max,
        Some(p) if p["pooling_mode_mean_tokens"] == true || p.is_object() => Pooling::Mean,
        _ => Pooling::Cls,
    };
    let max_tokens = json(dir, "sentence_bert_config.json")?
        .and_then(|s| s["max_seq_length"].as_u64())
        .map_or(cfg.max_position_embeddings, |m| (m as usize).min(cfg.max_position_embeddings));
    Ok(EncoderModel { model, tokenizer, pooling, normalize: has("Normalize"), max_tokens })
}
