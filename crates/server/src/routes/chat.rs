//! `POST /v1/chat/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessage, ChatResponseMessage, SamplingParams,
};

use super::generate::{collect, encode, sse, submit, usage, Piece};
use super::{parse, request_id};
use crate::state::unix_now;
use crate::{ApiError, AppState, ServedModel};

const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// Check the messages' roles and render them with the model's chat template.
pub(crate) fn render_messages(
    m: &ServedModel,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::BadRequest {
            message: "`messages` must not be empty".into(),
            param: Some("messages".into()),
        });
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for msg in messages {
        if !ROLES.contains(&msg.role.as_str()) {
            return Err(ApiError::BadRequest {
                message: format!("unknown message role `{}` (expected one of {})", msg.role, ROLES.join(", ")),
                param: Some("messages".into()),
            });
        }
        msgs.push((msg.role.clone(), msg.text()?));
    }
    let template = m
        .chat_template
        .as_ref()
        .ok_or_else(|| ApiError::bad("this model has no chat template; pass --chat-template or use /v1/completions"))?;
    template.render(&msgs, add_generation_prompt)
}

pub(crate) async fn handle(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse(&body)?;
    let m = st.model()?;
    st.check_name(&req.model)?;
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let params = SamplingParams::from_common(&req.common, max_tokens, &m.defaults)?;
    let prompt_text = render_messages(m, &req.messages, true)?;
    let prompt = encode(m, prompt_text, false).await?;
    let rs = submit(m, prompt, params)?;
    let (id, created, model) = (request_id("chatcmpl"), unix_now(), req.model.clone());
    if req.common.stream {
        let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |choices: Vec<ChatChunkChoice>, usage| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let first = chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta { role: Some("assistant"), content: Some(String::new()) },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        );
        let first = vec![serde_json::to_string(&first).map_err(|e| ApiError::Internal(e.to_string()))?];
        return Ok(sse(rs, first, include_usage, move |p| {
            let c = match p {
                Piece::Output(o) => {
                    let finish_reason = o.finished.map(|f| f.reason.as_str());
                    if o.text.is_empty() && finish_reason.is_none() {
                        return None;
                    }
                    let content = (!o.text.is_empty()).then(|| o.text.clone());
                    chunk(
                        vec![ChatChunkChoice {
                            index: 0,
                            delta: ChatDelta { role: None, content },
                            logprobs: None,
                            finish_reason,
                        }],
                        None,
                    )
                }
                Piece::Usage(u) => chunk(vec![], Some(u)),
            };
            serde_json::to_string(&c).ok()
        }));
    }
    let done = collect(rs).await?;
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatResponseMessage { role: "assistant", content: done.text },
            logprobs: None,
            finish_reason: Some(done.finished.reason.as_str()),
        }],
        usage: usage(&done.finished),
    })
    .into_response())
}
