//! `POST /v1/completions`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_protocol::{
    logprobs_count, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, KvTransferParams, Prompt,
    SamplingParams,
};

use super::generate::{collect, encode, sse, submit, usage, Piece};
use super::{logprobs, parse, proxy, request_id};
use crate::state::unix_now;
use crate::{ApiError, AppState};

fn bad(param: &str, message: &str) -> ApiError {
    ApiError::BadRequest { message: message.into(), param: Some(param.into()) }
}

pub(crate) async fn handle(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body.as_ref().map(Bytes::clone).unwrap_or_default();
    let req: CompletionRequest = parse(body)?;
    let m = st.model()?;
    st.check_name(&req.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(bad("suffix", "`suffix` is not supported by this server (no fill-in-the-middle)"));
    }
    let logprobs = req.logprobs.map(|k| logprobs_count("logprobs", k)).transpose()?;
    let mut params = SamplingParams::from_common(&req.common, req.common.max_tokens, logprobs, &m.defaults)?;
    // `echo` + `logprobs` scores the prompt too: the engine computes the prompt's
    // log-probabilities with as many alternatives as either field asks for.
    let echo_k = logprobs.filter(|_| req.echo);
    let prompt_k = params.prompt_logprobs;
    if let Some(k) = echo_k {
        params.prompt_logprobs = Some(prompt_k.unwrap_or(0).max(k));
    }
    let (prompt, echo_text) = match req.prompt {
        Prompt::Text(s) => (encode(m, s.clone(), true).await?, s),
        Prompt::Tokens(t) => (t, String::new()),
        Prompt::TextBatch(mut v) if v.len() == 1 => {
            let s = v.remove(0);
            (encode(m, s.clone(), true).await?, s)
        }
        Prompt::TokenBatch(mut v) if v.len() == 1 => (v.remove(0), String::new()),
        _ => return Err(bad("prompt", "batched prompts are not supported; send one prompt per request")),
    };
    let echo = if !req.echo {
        String::new()
    } else if echo_text.is_empty() {
        super::generate::check_vocab(m, &prompt, "prompt")?;
        m.tokenizer.decode(&prompt, false).map_err(|e| ApiError::bad(format!("cannot detokenize the prompt: {e}")))?
    } else {
        echo_text
    };
    let prompt_ids = prompt.clone();
    let scored = move |m: &crate::state::ServedModel, lps: Option<&[Option<tessera_protocol::TokenLogprobs>]>| {
        let lps = lps.unwrap_or(&[]);
        (
            echo_k.map(|k| logprobs::echo(m, &prompt_ids, lps, k)),
            prompt_k.map(|k| logprobs::prompt(m, &prompt_ids, lps, k)),
        )
    };
    let mut kv_params = req.common.kv_transfer_params.clone();
    if let Some(p) = proxy::prefill_first(m, &headers, "/v1/completions", &raw, &params, kv_params.as_ref()).await? {
        params.kv = KvTransferParams::intent(Some(&p))?;
        kv_params = Some(p);
    }
    let kv = (kv_params.as_ref(), req.common.stream);
    let streams = submit(&st, m, &req.model, prompt, params, kv)?;
    let (id, created, model) = (request_id("cmpl"), unix_now(), req.model.clone());
    if req.common.stream {
        let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |choices: Vec<CompletionChoice>, usage| CompletionChunk {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices,
            usage,
        };
        // Without prompt scores the echo goes out at once; with them it waits for the first
        // output, which carries the prompt's log-probabilities.
        let waits = echo_k.is_some() || prompt_k.is_some();
        let mut first = Vec::new();
        if !echo.is_empty() && !waits {
            for index in 0..streams.len() {
                let text = echo.clone();
                let c = chunk(
                    vec![CompletionChoice { index, text, logprobs: None, finish_reason: None, prompt_logprobs: None }],
                    None,
                );
                first.push(serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?);
            }
        }
        let st2 = st.clone();
        let mut offsets = vec![echo.len(); streams.len()];
        let mut pending_echo = vec![waits; streams.len()];
        return Ok(sse(streams, first, include_usage, move |p| {
            let c = match p {
                Piece::Output(index, o) => {
                    let finish_reason = o.finished.map(|f| f.reason.as_str());
                    let head = std::mem::take(&mut pending_echo[index]);
                    if !head && o.text.is_empty() && finish_reason.is_none() && o.logprobs.is_empty() {
                        return None;
                    }
                    let m = st2.loaded()?;
                    let (echo_lp, prompt_logprobs) =
                        if head { scored(m, o.prompt_logprobs.as_deref()) } else { (None, None) };
                    let mut lp = echo_lp;
                    if !o.logprobs.is_empty() {
                        let more = logprobs::completion(m, &o.token_ids, &o.logprobs, offsets[index]);
                        offsets[index] += more.tokens.iter().map(String::len).sum::<usize>();
                        match &mut lp {
                            Some(l) => l.extend(more),
                            None => lp = Some(more),
                        }
                    }
                    let text = if head { format!("{echo}{}", o.text) } else { o.text.clone() };
                    chunk(vec![CompletionChoice { index, text, logprobs: lp, finish_reason, prompt_logprobs }], None)
                }
                Piece::Usage(u) => chunk(vec![], Some(u)),
            };
            serde_json::to_string(&c).ok()
        }));
    }
    let done = collect(streams).await?;
    let usage = usage(done.iter().map(|d| &d.finished));
    let kv_transfer_params = super::disagg::response(done.first().and_then(|d| d.kv_pinned.as_ref()));
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(index, d)| {
            let (echo_lp, prompt_logprobs) = scored(m, d.prompt_logprobs.as_deref());
            let generated = logprobs.map(|_| logprobs::completion(m, &d.token_ids, &d.logprobs, echo.len()));
            let logprobs = match (echo_lp, generated) {
                (Some(mut e), Some(g)) => {
                    e.extend(g);
                    Some(e)
                }
                (e, g) => e.or(g),
            };
            CompletionChoice {
                index,
                logprobs,
                text: format!("{echo}{}", d.text),
                finish_reason: Some(d.finished.reason.as_str()),
                prompt_logprobs,
            }
        })
        .collect();
    let body = CompletionResponse { id, object: "text_completion", created, model, choices, usage, kv_transfer_params };
    Ok(Json(body).into_response())
}
