//! What both completion endpoints share: tokenising, submitting, collecting whole answers,
//! and turning the choices' engine outputs into SSE events.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tessera_engine::kv::transfer::PinnedKv;
use tessera_engine::{EngineError, EngineRequest, Finished, RequestOutput, RequestStream};
use tessera_protocol::TokenLogprobs;
use tessera_protocol::{KvTransferParams, SamplingParams, Usage};

use crate::state::ServedModel;
use crate::{ApiError, AppState};

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

/// Validate what needs the model (vocabulary, scheduling policy, the prefill/decode leg given
/// by `kv`: the request's `kv_transfer_params` and whether it streams) and submit; one
/// stream per choice.
pub(crate) fn submit(
    st: &AppState,
    m: &ServedModel,
    model_name: &str,
    prompt: Vec<u32>,
    params: SamplingParams,
    kv: (Option<&KvTransferParams>, bool),
) -> Result<Vec<RequestStream>, ApiError> {
    check_vocab(m, &prompt, "prompt")?;
    check_vocab(m, &params.stop_token_ids, "stop_token_ids")?;
    let bias: Vec<u32> = params.logit_bias.iter().map(|b| b.0).collect();
    check_vocab(m, &bias, "logit_bias")?;
    let engine = m.generator()?;
    if params.priority != 0 && engine.config().scheduler.policy == tessera_engine::Policy::Fcfs {
        return Err(ApiError::BadRequest {
            message: "`priority` needs priority scheduling; start the server with --scheduling-policy priority".into(),
            param: Some("priority".into()),
        });
    }
    let remote = super::disagg::leg(m, kv.0, &params, kv.1, prompt.len())?;
    let criticality = st.criticality(model_name);
    let lora = st.lora_for(model_name)?;
    let engine = m.least_loaded().unwrap_or(engine);
    Ok(engine.submit(EngineRequest { prompt, params, criticality, remote, lora })?)
}

/// One choice's whole answer.
pub(crate) struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprobs>,
    /// Per prompt token, when prompt log-probabilities were asked for.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub finished: Finished,
    /// A prefill leg's pinned KV.
    pub kv_pinned: Option<PinnedKv>,
}

async fn collect_one(mut rs: RequestStream) -> Result<Collected, ApiError> {
    let (mut text, mut token_ids, mut logprobs, mut prompt_logprobs) = (String::new(), Vec::new(), Vec::new(), None);
    while let Some(item) = rs.next().await {
        let out = item?;
        text.push_str(&out.text);
        token_ids.extend_from_slice(&out.token_ids);
        logprobs.extend(out.logprobs);
        if out.prompt_logprobs.is_some() {
            prompt_logprobs = out.prompt_logprobs;
        }
        if let Some(finished) = out.finished {
            let kv_pinned = out.kv_pinned;
            return Ok(Collected { text, token_ids, logprobs, prompt_logprobs, finished, kv_pinned });
        }
    }
    Err(ApiError::Internal("the engine ended the request without a result".into()))
}

/// Every choice's whole answer, in choice order. Dropping this future cancels them all.
pub(crate) async fn collect(streams: Vec<RequestStream>) -> Result<Vec<Collected>, ApiError> {
    futures::future::try_join_all(streams.into_iter().map(collect_one)).await
}

/// Usage of a request: the prompt once, the completions of all choices.
pub(crate) fn usage<'a>(finished: impl IntoIterator<Item = &'a Finished>) -> Usage {
    let (mut prompt, mut completion) = (0, 0);
    for f in finished {
        prompt = f.prompt_tokens;
        completion += f.completion_tokens;
    }
    Usage::new(prompt, completion)
}

/// What an endpoint turns into SSE chunks.
pub(crate) enum Piece<'a> {
    /// Output of choice `index`.
    Output(usize, &'a RequestOutput),
    Usage(Usage),
}

/// A choice's outputs as a stream of `(index, item)` up to its finished output or error; an
/// item `None` means the engine dropped the choice without a result.
fn tagged(index: usize, rs: RequestStream) -> impl Stream<Item = (usize, Option<Result<RequestOutput, EngineError>>)> {
    futures::stream::unfold(Some(rs), move |rs| async move {
        let mut rs = rs?;
        match rs.next().await {
            Some(Ok(out)) => {
                let more = out.finished.is_none();
                Some(((index, Some(Ok(out))), more.then_some(rs)))
            }
            Some(Err(e)) => Some(((index, Some(Err(e))), None)),
            None => Some(((index, None), None)),
        }
    })
}

/// Stream the choices as SSE: `first` events, then one chunk per output (via `encode`), an
/// optional usage chunk once every choice has finished, then `data: [DONE]`. An error ends
/// the stream with an OpenAI error event (and cancels the other choices).
pub(crate) fn sse<F>(streams: Vec<RequestStream>, first: Vec<String>, include_usage: bool, encode: F) -> Response
where
    F: FnMut(Piece<'_>) -> Option<String> + Send + 'static,
{
    let n = streams.len();
    let merged = futures::stream::select_all(streams.into_iter().enumerate().map(|(i, rs)| tagged(i, rs).boxed()));
    let queue: VecDeque<Event> = first.into_iter().map(|d| Event::default().data(d)).collect();
    let state = (merged, encode, queue, Vec::<Finished>::new(), false);
    let stream =
        futures::stream::unfold(state, move |(mut merged, mut encode, mut q, mut done_list, mut done)| async move {
            loop {
                if let Some(e) = q.pop_front() {
                    return Some((Ok::<Event, Infallible>(e), (merged, encode, q, done_list, done)));
                }
                if done {
                    return None;
                }
                let failure = match merged.next().await {
                    Some((i, Some(Ok(out)))) => {
                        if let Some(d) = encode(Piece::Output(i, &out)) {
                            q.push_back(Event::default().data(d));
                        }
                        let Some(f) = out.finished else { continue };
                        done_list.push(f);
                        if done_list.len() < n {
                            continue;
                        }
                        if include_usage {
                            if let Some(d) = encode(Piece::Usage(usage(&done_list))) {
                                q.push_back(Event::default().data(d));
                            }
                        }
                        None
                    }
                    Some((_, Some(Err(e)))) => Some(ApiError::from(e)),
                    Some((_, None)) | None => {
                        Some(ApiError::Internal("the engine ended the request without a result".into()))
                    }
                };
                if let Some(e) = failure {
                    q.push_back(error_event(e));
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
