//! `POST /v1/chat/completions`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use tessera_protocol::{
    logprobs_count, tool_request, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatMessage, ChatResponseMessage, FunctionCall, KvTransferParams,
    SamplingParams, StructuredOutput, ToolCallDelta, ToolCallOut, ToolChoice, ToolParser, ToolRequest,
};

use super::generate::{collect, encode, sse, submit, usage, Piece};
use super::{logprobs, parse, proxy, request_id};
use crate::state::unix_now;
use crate::{ApiError, AppState, ServedModel, TemplateMessage};

const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// Check the messages' roles and render them with the model's chat template (with the
/// request's `tools` when it offers any).
pub(crate) fn render_messages(
    m: &ServedModel,
    messages: &[ChatMessage],
    tools: Option<&[Value]>,
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
        msgs.push(TemplateMessage {
            role: msg.role.clone(),
            content: msg.text()?,
            name: msg.name.clone(),
            tool_calls: msg.tool_calls.clone(),
            tool_call_id: msg.tool_call_id.clone(),
        });
    }
    let template = m
        .chat_template
        .as_ref()
        .ok_or_else(|| ApiError::bad("this model has no chat template; pass --chat-template or use /v1/completions"))?;
    template.render_with_tools(&msgs, tools, add_generation_prompt)
}

/// The request's tools, checked against what the flags allow (vLLM's rule: `auto` needs
/// `--enable-auto-tool-choice` and `--tool-call-parser`).
fn tools_of(m: &ServedModel, req: &ChatCompletionRequest) -> Result<Option<ToolRequest>, ApiError> {
    let tools = tool_request(req.tools.as_deref(), req.tool_choice.as_ref())?;
    if tools.as_ref().is_some_and(|t| t.choice == ToolChoice::Auto) && !(m.tools.auto && m.tools.parser.is_some()) {
        return Err(ApiError::BadRequest {
            message: "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set".into(),
            param: Some("tool_choice".into()),
        });
    }
    Ok(tools)
}

/// A finished choice as (content, tool calls with their ids, finish reason): a forced
/// choice's output is the calls (`required`: a list of `{name, parameters}`, a named function:
/// its arguments); `auto` text goes through the parser; text that holds no well-formed call
/// stays content and keeps the engine's `reason`.
fn read_calls(
    tools: Option<&ToolRequest>,
    parser: Option<ToolParser>,
    text: String,
    reason: &'static str,
) -> (Option<String>, Vec<ToolCallOut>, &'static str) {
    let (content, calls) = match (tools.map(|t| (t, &t.choice)), parser) {
        (Some((t, ToolChoice::Required | ToolChoice::Named(_))), _) => match t.forced_calls(&text) {
            Some(calls) => (None, calls),
            None => (Some(text), vec![]),
        },
        (Some((_, ToolChoice::Auto)), Some(p)) => match p.parse(&text) {
            (_, calls) if calls.is_empty() => (Some(text), vec![]),
            (content, calls) => ((!content.is_empty()).then_some(content), calls),
        },
        _ => (Some(text), vec![]),
    };
    let finish = if calls.is_empty() { reason } else { "tool_calls" };
    let out = |function: FunctionCall| ToolCallOut { id: request_id("chatcmpl-tool"), kind: "function", function };
    (content, calls.into_iter().map(out).collect(), finish)
}

pub(crate) async fn handle(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    let req: ChatCompletionRequest = parse(body)?;
    let m = st.model()?;
    st.check_name(&req.model)?;
    // `tool_choice: none` offers no tools and reads no calls.
    let tools = tools_of(m, &req)?.filter(|t| t.choice != ToolChoice::None);
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::BadRequest {
                message: "`top_logprobs` needs `logprobs: true`".into(),
                param: Some("top_logprobs".into()),
            })
        }
        (false, _) => None,
        (true, k) => Some(logprobs_count("top_logprobs", k.unwrap_or(0))?),
    };
    let mut params = SamplingParams::from_common(&req.common, max_tokens, logprobs, &m.defaults)?;
    if params.max_tokens == Some(0) {
        let message = "`max_tokens` must be at least 1 for chat (0 is for scoring prompts on /v1/completions)";
        return Err(ApiError::BadRequest { message: message.into(), param: Some("max_tokens".into()) });
    }
    if req.common.stream && params.prompt_logprobs.is_some() {
        // As vLLM: the prompt's scores come with the whole response only.
        let message = "`prompt_logprobs` are not available when `stream` is true";
        return Err(ApiError::BadRequest { message: message.into(), param: Some("prompt_logprobs".into()) });
    }
    if let Some(constraint) = tools.as_ref().and_then(ToolRequest::constraint) {
        if params.constraint.is_some() {
            let message = "`tool_choice` forces a function call; it cannot be combined with another structured output";
            return Err(ApiError::BadRequest { message: message.into(), param: Some("tool_choice".into()) });
        }
        params.constraint = Some(StructuredOutput { param: "tool_choice".into(), constraint });
    }
    let prompt_k = params.prompt_logprobs;
    let offered = tools.as_ref().and(req.tools.as_deref());
    let prompt_text = render_messages(m, &req.messages, offered, true)?;
    let prompt = encode(m, prompt_text, false).await?;
    let prompt_ids = prompt.clone();
    let mut kv_params = req.common.kv_transfer_params.clone();
    if let Some(p) =
        proxy::prefill_first(m, &headers, "/v1/chat/completions", &raw, &params, kv_params.as_ref()).await?
    {
        params.kv = KvTransferParams::intent(Some(&p))?;
        kv_params = Some(p);
    }
    let kv = (kv_params.as_ref(), req.common.stream);
    let streams = submit(&st, m, &req.model, prompt, params, kv)?;
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
        let mut first = Vec::with_capacity(streams.len());
        for index in 0..streams.len() {
            let c = chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: vec![] },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            );
            first.push(serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?);
        }
        let st2 = st.clone();
        // With tools in play a choice's text is held until it ends, then sent as content or
        // as whole tool calls (one delta per call, arguments complete).
        let (parser, mut held) = (m.tools.parser, std::collections::HashMap::<usize, String>::new());
        return Ok(sse(streams, first, include_usage, move |p| {
            let c = match p {
                Piece::Output(index, o) if tools.is_some() => {
                    let text = held.entry(index).or_default();
                    text.push_str(&o.text);
                    let reason = o.finished.as_ref()?.reason.as_str();
                    let (content, calls, finish) = read_calls(tools.as_ref(), parser, std::mem::take(text), reason);
                    let tool_calls =
                        calls.into_iter().enumerate().map(|(index, call)| ToolCallDelta { index, call }).collect();
                    let delta = ChatDelta { role: None, content, tool_calls };
                    chunk(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: Some(finish) }], None)
                }
                Piece::Output(index, o) => {
                    let finish_reason = o.finished.map(|f| f.reason.as_str());
                    if o.text.is_empty() && finish_reason.is_none() && o.logprobs.is_empty() {
                        return None;
                    }
                    let content = (!o.text.is_empty()).then(|| o.text.clone());
                    let logprobs = st2
                        .loaded()
                        .filter(|_| !o.logprobs.is_empty())
                        .map(|m| logprobs::chat(m, &o.token_ids, &o.logprobs));
                    chunk(
                        vec![ChatChunkChoice {
                            index,
                            delta: ChatDelta { role: None, content, tool_calls: vec![] },
                            logprobs,
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
    let done = collect(streams).await?;
    let usage = usage(done.iter().map(|d| &d.finished));
    let kv_transfer_params = super::disagg::response(done.first().and_then(|d| d.kv_pinned.as_ref()));
    let prompt_logprobs = prompt_k.map(|k| {
        let lps = done.first().and_then(|d| d.prompt_logprobs.as_deref()).unwrap_or(&[]);
        logprobs::prompt(m, &prompt_ids, lps, k)
    });
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(index, d)| {
            let (content, tool_calls, finish) =
                read_calls(tools.as_ref(), m.tools.parser, d.text, d.finished.reason.as_str());
            ChatChoice {
                index,
                logprobs: logprobs.map(|_| logprobs::chat(m, &d.token_ids, &d.logprobs)),
                message: ChatResponseMessage { role: "assistant", content, tool_calls },
                finish_reason: Some(finish),
            }
        })
        .collect();
    let body = ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage,
        prompt_logprobs,
        kv_transfer_params,
    };
    Ok(Json(body).into_response())
}
