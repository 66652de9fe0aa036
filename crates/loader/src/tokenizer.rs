//! Tokenizer, chat template, special tokens and generation defaults, from a Hugging Face
//! directory (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) or from
//! GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tessera_models::ModelConfig;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{LoadError, Result};

/// Default sampling values a model ships in `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
}

/// The tokenizer and the text-level facts a server needs about a model.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every token id that ends generation.
    pub eos_token_ids: Vec<u32>,
    pub defaults: GenerationDefaults,
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_json(p: &Path) -> Result<Option<serde_json::Value>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).map_err(|e| LoadError::io(p, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| LoadError::Format(format!("{}: {e}", p.display())))
}

fn ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn gguf_err(file: &Path, key: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Format(format!("{}: GGUF `{key}`: {e}", file.display()))
}

fn gguf_strings(c: &Content, key: &str, file: &Path) -> Result<Vec<String>> {
    let v = c
        .metadata
        .get(key)
        .ok_or_else(|| gguf_err(file, key, "missing"))?
        .to_vec()
        .map_err(|e| gguf_err(file, key, e))?;
    v.iter().map(|x| x.to_string().cloned().map_err(|e| gguf_err(file, key, e))).collect()
}

fn gguf_u32(c: &Content, key: &str) -> Option<u32> {
    let v = c.metadata.get(key)?;
    v.to_u32().ok().or_else(|| v.to_i32().ok().map(|x| x as u32))
}

impl TokenizerBundle {
    /// Read `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`).
    pub fn from_hf_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        if !tp.is_file() {
            return Err(LoadError::Format(format!("{}: missing tokenizer.json", dir.display())));
        }
        let tokenizer = Tokenizer::from_file(&tp).map_err(|e| LoadError::Format(format!("{}: {e}", tp.display())))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let gc = read_json(&dir.join("generation_config.json"))?.unwrap_or_default();
        let chat_template = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take `default`, else the first.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        let bos_token = tc.get("bos_token").and_then(token_text);
        let eos_token = tc.get("eos_token").and_then(token_text);
        let mut eos_ids = cfg.eos_token_ids.clone();
        eos_ids.extend(ids(gc.get("eos_token_id")));
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let defaults = GenerationDefaults {
            temperature: gc.get("temperature").and_then(|v| v.as_f64()).map(|x| x as f32),
            top_p: gc.get("top_p").and_then(|v| v.as_f64()).map(|x| x as f32),
            top_k: gc.get("top_k").and_then(|v| v.as_i64()),
        };
        Ok(Self { tokenizer, chat_template, bos_token, eos_token, eos_token_ids: eos_ids, defaults })
    }

    /// Build the tokenizer GGUF metadata describes: byte-level BPE (`tokenizer.ggml.model =
    /// gpt2`) or SentencePiece BPE (`llama`).
    pub fn from_gguf(c: &Content, file: &Path) -> Result<Self> {
        let model =
            c.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok().cloned()).unwrap_or_default();
        let tokens = gguf_strings(c, "tokenizer.ggml.tokens", file)?;
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![],
        };
        let mut tokenizer = match model.as_str() {
            "gpt2" => Self::byte_level(c, file, &tokens)?,
            "llama" => {
                let scores: Vec<f32> = match c.metadata.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    _ => vec![],
                };
                let unk = gguf_u32(c, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize));
                let prefix =
                    c.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
                crate::spm::build(&tokens, &scores, &types, unk.map(String::as_str), prefix)
                    .map_err(|e| gguf_err(file, "tokenizer.ggml.tokens", e))?
            }
            other => {
                return Err(LoadError::Format(format!(
                    "{}: GGUF tokenizer model `{other}` is not supported (byte-level BPE `gpt2`, SentencePiece \
                     `llama`); serve a Hugging Face directory with tokenizer.json instead",
                    file.display()
                )))
            }
        };
        // Control (3) and user-defined (4) tokens are matched whole in text, like llama.cpp
        // does with special-token parsing on.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(s, t)| AddedToken::from(s.clone(), *t == 3))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| gguf_err(file, "tokenizer.ggml.tokens", format!("special tokens: {e}")))?;
        let bos_id = gguf_u32(c, "tokenizer.ggml.bos_token_id");
        let eos_id = gguf_u32(c, "tokenizer.ggml.eos_token_id");
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let (bos_token, eos_token) = (name(bos_id), name(eos_id));
        let add_bos = c.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        if let (true, Some(b), Some(id)) = (add_bos, bos_token.as_ref(), bos_id) {
            let tp = TemplateProcessing::builder()
                .try_single(format!("{b}:0 $A:0"))
                .and_then(|t| t.special_tokens(vec![(b.clone(), id)]).build().map_err(|e| e.to_string()))
                .map_err(|e| gguf_err(file, "tokenizer.ggml.add_bos_token", e))?;
            tokenizer.with_post_processor(Some(tp));
        }
        let mut eos_token_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(e) = gguf_u32(c, "tokenizer.ggml.eot_token_id") {
            eos_token_ids.push(e);
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        Ok(Self {
            tokenizer,
            chat_template: c.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned()),
            bos_token,
            eos_token,
            eos_token_ids,
            defaults: GenerationDefaults::default(),
        })
    }

    /// The byte-level BPE of a `gpt2` GGUF vocabulary (its merges and pre-tokenizer).
    fn byte_level(c: &Content, file: &Path, tokens: &[String]) -> Result<Tokenizer> {
        let merges = gguf_strings(c, "tokenizer.ggml.merges", file)?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| gguf_err(file, "tokenizer.ggml.merges", format!("bad merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| gguf_err(file, "tokenizer.ggml.merges", e))?;
        let pre = c
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".into());
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                .map(PreTokenizerWrapper::Split)
                .map_err(|e| gguf_err(file, "tokenizer.ggml.pre", e))
        };
        let pre_tok = match pre.as_str() {
            "smollm" | "starcoder" | "refact" | "codeshell" => Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]),
            "default" | "gpt-2" | "gpt2" => {
                Sequence::new(vec![PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))])
            }
            "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![
                split(LLAMA3_REGEX)?,
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]),
            "qwen2" => Sequence::new(vec![
                split(QWEN2_REGEX)?,
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]),
            other => {
                return Err(gguf_err(
                    file,
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer `{other}` is not supported (smollm, starcoder, gpt-2, llama-bpe, qwen2)"),
                ))
            }
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre_tok)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tokenizer)
    }

    /// Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into `dir`.
    pub fn write_hf_files(&self, dir: &Path) -> Result<()> {
        let tp = dir.join("tokenizer.json");
        self.tokenizer.save(&tp, false).map_err(|e| LoadError::Format(format!("{}: {e}", tp.display())))?;
        let tc = serde_json::json!({
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": false,
        });
        let gc = serde_json::json!({ "eos_token_id": self.eos_token_ids });
        for (name, v) in [("tokenizer_config.json", tc), ("generation_config.json", gc)] {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap_or_default()).map_err(|e| LoadError::io(&p, e))?;
        }
        Ok(())
    }
}
