//! `POST /v1/embeddings` (OpenAI's shape, as vLLM serves it): the input as one string, strings,
//! token ids or lists of ids; `encoding_format` float or base64 (little-endian f32); `dimensions`
//! where the model allows; usage in prompt tokens.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ProtocolError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

/// What to embed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// An input to embed: text to tokenise, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingItem {
    Text(String),
    Ids(Vec<u32>),
}

impl EmbeddingRequest {
    /// The inputs in order; none is a 400.
    pub fn items(&self) -> Result<Vec<EmbeddingItem>, ProtocolError> {
        let items: Vec<EmbeddingItem> = match &self.input {
            EmbeddingInput::Text(s) => vec![EmbeddingItem::Text(s.clone())],
            EmbeddingInput::Texts(v) => v.iter().cloned().map(EmbeddingItem::Text).collect(),
            EmbeddingInput::Ids(v) => vec![EmbeddingItem::Ids(v.clone())],
            EmbeddingInput::IdLists(v) => v.iter().cloned().map(EmbeddingItem::Ids).collect(),
        };
        let empty = |i: &EmbeddingItem| match i {
            EmbeddingItem::Text(s) => s.is_empty(),
            EmbeddingItem::Ids(v) => v.is_empty(),
        };
        if items.is_empty() || items.iter().any(empty) {
            return Err(ProtocolError::param("input", "`input` must hold at least one non-empty text or token list"));
        }
        Ok(items)
    }

    /// Whether vectors go out as base64 (else as JSON floats).
    pub fn base64(&self) -> Result<bool, ProtocolError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(false),
            Some("base64") => Ok(true),
            Some(other) => Err(ProtocolError::param(
                "encoding_format",
                format!("`encoding_format` must be float or base64, got `{other}`"),
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingData {
    pub object: &'static str,
    pub index: usize,
    /// Floats, or base64 of their little-endian f32 bytes.
    pub embedding: Value,
}

impl EmbeddingData {
    pub fn new(index: usize, v: &[f32], base64: bool) -> Self {
        let embedding = if base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            Value::from(v.to_vec())
        };
        Self { object: "embedding", index, embedding }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: EmbeddingUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> EmbeddingRequest {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn every_input_shape_and_format() {
        let items = |b: &str| req(b).items().unwrap();
        assert_eq!(items(r#"{"model":"m","input":"hi"}"#), vec![EmbeddingItem::Text("hi".into())]);
        assert_eq!(items(r#"{"model":"m","input":["a","b"]}"#).len(), 2);
        assert_eq!(items(r#"{"model":"m","input":[1,2,3]}"#), vec![EmbeddingItem::Ids(vec![1, 2, 3])]);
        assert_eq!(items(r#"{"model":"m","input":[[1],[2,3]]}"#).len(), 2);
        for bad in [r#"{"model":"m","input":[]}"#, r#"{"model":"m","input":""}"#, r#"{"model":"m","input":["a",""]}"#] {
            assert_eq!(req(bad).items().unwrap_err().param.as_deref(), Some("input"), "{bad}");
        }
        assert!(!req(r#"{"model":"m","input":"a"}"#).base64().unwrap());
        assert!(req(r#"{"model":"m","input":"a","encoding_format":"base64"}"#).base64().unwrap());
        assert!(req(r#"{"model":"m","input":"a","encoding_format":"hex"}"#).base64().is_err());
        let d = EmbeddingData::new(0, &[1.0, -2.5], true);
        let bytes = base64::engine::general_purpose::STANDARD.decode(d.embedding.as_str().unwrap()).unwrap();
        assert_eq!(bytes, [1f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }
}
