//! Wire types of the OpenAI-compatible API (as vLLM serves it) and request validation.
//!
//! Owns: request/response JSON shapes, [`SamplingParams`] (the engine-neutral result of
//! validation), and [`ProtocolError`], which says which field is wrong.
//! Must not touch: I/O, tokenisation, the engine or HTTP status mapping.

mod embeddings;
mod error;
mod kv_transfer;
mod requests;
mod responses;
mod sampling;
mod structured;
mod tools;

pub use embeddings::{
    EmbeddingData, EmbeddingInput, EmbeddingItem, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
};
pub use error::ProtocolError;
pub use kv_transfer::{KvIntent, KvTransferParams};
pub use requests::CommonParams;
pub use requests::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, MessageContent, Prompt, StopSpec,
    StreamOptions, TokenizeRequest,
};
pub use responses::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatLogprobs,
    ChatResponseMessage, ChatTokenLogprob, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse,
    DetokenizeResponse, ErrorBody, ErrorResponse, ModelCard, ModelList, PromptLogprob, PromptLogprobs,
    TokenizeResponse, ToolCallDelta, ToolCallOut, TopLogprob, Usage,
};
pub use sampling::{logprobs_count, FinishReason, ModelDefaults, SamplingParams, TokenLogprobs, MAX_LOGPROBS};
pub use structured::{constraint, Constraint, StructuredOutput};
pub use tools::{tool_request, FunctionCall, Tool, ToolChoice, ToolParser, ToolRequest};
