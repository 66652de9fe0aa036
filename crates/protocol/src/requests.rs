//! Request bodies of `/v1/completions` and `/v1/chat/completions`.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

/// `prompt` of a completion request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    TextBatch(Vec<String>),
    TokenBatch(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints (flattened into each request).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct CommonParams {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// Keep generating past end-of-sequence tokens (vLLM extension).
    #[serde(default)]
    pub ignore_eos: bool,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub min_tokens: Option<i64>,
    /// Token id (as a string, as OpenAI sends it) → bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
    pub skip_special_tokens: Option<bool>,
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    /// Lower runs first (needs `--scheduling-policy priority`).
    pub priority: Option<i64>,
    /// llm-d's prefill/decode leg marker (null: an ordinary request).
    pub kv_transfer_params: Option<crate::KvTransferParams>,
    // Known fields this server cannot honour: refused with a 400 naming them when set.
    pub best_of: Option<i64>,
    pub prompt_logprobs: Option<i64>,
    #[serde(default)]
    pub use_beam_search: bool,
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    /// vLLM's newer spelling: `{json | regex | choice | grammar | json_object}`.
    pub structured_outputs: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    /// Number of most likely alternatives per token, with the chosen token's log-probability.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// One part of a multi-part message content.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `content` of a chat message.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// An assistant turn's calls (`[{id, type, function: {name, arguments}}]`), as returned.
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` turn's answer to this call.
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    #[serde(flatten)]
    pub common: CommonParams,
}

impl ChatMessage {
    /// The message text (parts of type `text` joined), or a message naming what is wrong.
    pub fn text(&self) -> Result<String, crate::ProtocolError> {
        match &self.content {
            None => Ok(String::new()),
            Some(MessageContent::Text(s)) => Ok(s.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(crate::ProtocolError::param(
                            "messages",
                            format!("content part type `{}` is not supported (only `text`)", p.kind),
                        ));
                    }
                    out.push_str(p.text.as_deref().unwrap_or(""));
                }
                Ok(out)
            }
        }
    }
}

fn yes() -> bool {
    true
}

/// `POST /tokenize` (vLLM): a `prompt`, or chat `messages` rendered with the chat template.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Default: true for a prompt, false for messages (the template adds them), as in vLLM.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub return_token_strs: bool,
}

/// `POST /detokenize` (vLLM).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}
