//! What both completion endpoints share: tokenising, submitting, collecting a whole answer,
//! and turning engine outputs into SSE events.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tessera_engine::{EngineRequest, Finished, RequestOutput, RequestStream};
use tessera_protocol::{SamplingParams, Usage};

use crate::state::ServedModel;
use crate::ApiError;

/// Tokenise on the blocking pool (long prompts must not stall the runtime).
pub(crate) async fn encode(m: &ServedModel, text: String, add_special: bool) -> Result<Vec<u32>, ApiError> {
    let tok = m.tokenizer.clone();
    tokio::task::spawn_blocking(move || tok.encode(text, add_special).map(|e| e.get_ids().to_vec()))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| ApiError::bad(format!("cannot tokenize the prompt: {e}")))
}

/// Every id must be in the model's vocabulary; the error names `param`.
pub(crate) fn check_vocab(m: &ServedModel, ids: &[u32], param: &str) -> Result<(), ApiError> {
    match ids.iter().find(|&&t| t as usize >= m.vocab_size) {
        Some(bad) => Err(ApiError::BadRequest {
            message: format!("token id {bad} is out of range (vocabulary size {})", m.vocab_size),
            param: Some(param.into()),
        }),
        None => Ok(()),
    }
}

pub(crate) fn submit(m: &ServedModel, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestStream, ApiError> {
    check_vocab(m, &prompt, "prompt")?;
    Ok(m.engine.submit(EngineRequest { prompt, params })?)
}

/// A whole answer.
pub(crate) struct Collected {
    pub text: String,
    pub finished: Finished,
}

pub(crate) async fn collect(mut rs: RequestStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    while let Some(item) = rs.next().await {
        let out = item?;
        text.push_str(&out.text);
        if let Some(finished) = out.finished {
            return Ok(Collected { text, finished });
        }
    }
    Err(ApiError::Internal("the engine ended the request without a result".into()))
}

pub(crate) fn usage(f: &Finished) -> Usage {
    Usage::new(f.prompt_tokens, f.completion_tokens)
}

/// What an endpoint turns into SSE chunks.
pub(crate) enum Piece<'a> {
    Output(&'a RequestOutput),
    Usage(Usage),
}

/// Stream engine outputs as SSE: `first` events, then one chunk per output (via `encode`),
/// an optional usage chunk, then `data: [DONE]`. Errors become an OpenAI error event.
pub(crate) fn sse<F>(rs: RequestStream, first: Vec<String>, include_usage: bool, encode: F) -> Response
where
    F: FnMut(Piece<'_>) -> Option<String> + Send + 'static,
{
    let queue: VecDeque<Event> = first.into_iter().map(|d| Event::default().data(d)).collect();
    let stream =
        futures::stream::unfold((rs, encode, queue, false), move |(mut rs, mut encode, mut q, mut done)| async move {
            loop {
                if let Some(e) = q.pop_front() {
                    return Some((Ok::<Event, Infallible>(e), (rs, encode, q, done)));
                }
                if done {
                    return None;
                }
                match rs.next().await {
                    Some(Ok(out)) => {
                        if let Some(d) = encode(Piece::Output(&out)) {
                            q.push_back(Event::default().data(d));
                        }
                        let Some(f) = out.finished else { continue };
                        if include_usage {
                            if let Some(d) = encode(Piece::Usage(usage(&f))) {
                                q.push_back(Event::default().data(d));
                            }
                        }
                    }
                    Some(Err(e)) => q.push_back(error_event(ApiError::from(e))),
                    None => q.push_back(error_event(ApiError::Internal(
                        "the engine ended the request without a result".into(),
                    ))),
                }
                q.push_back(Event::default().data("[DONE]"));
                done = true;
            }
        });
    sse_response(stream)
}

fn error_event(e: ApiError) -> Event {
    Event::default().data(serde_json::to_string(&e.body()).unwrap_or_default())
}

fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
