//! `POST /v1/completions`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_protocol::{
    logprobs_count, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, Prompt, SamplingParams,
};

use super::generate::{collect, encode, sse, submit, usage, Piece};
use super::{logprobs, parse, request_id};
use crate::state::unix_now;
use crate::{ApiError, AppState};

fn bad(param: &str, message: &str) -> ApiError {
    ApiError::BadRequest { message: message.into(), param: Some(param.into()) }
}

pub(crate) async fn handle(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let m = st.model()?;
    st.check_name(&req.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(bad("suffix", "`suffix` is not supported by this server (no fill-in-the-middle)"));
    }
    let logprobs = req.logprobs.map(|k| logprobs_count("logprobs", k)).transpose()?;
    if req.echo && logprobs.is_some() {
        return Err(bad("echo", "`echo` with `logprobs` needs prompt log-probabilities, which are not computed"));
    }
    let params = SamplingParams::from_common(&req.common, req.common.max_tokens, logprobs, &m.defaults)?;
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
    let streams = submit(&st, m, &req.model, prompt, params)?;
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
        let mut first = Vec::new();
        if !echo.is_empty() {
            for index in 0..streams.len() {
                let c = chunk(
                    vec![CompletionChoice { index, text: echo.clone(), logprobs: None, finish_reason: None }],
                    None,
                );
                first.push(serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?);
            }
        }
        let st2 = st.clone();
        let mut offsets = vec![echo.len(); streams.len()];
        return Ok(sse(streams, first, include_usage, move |p| {
            let c = match p {
                Piece::Output(index, o) => {
                    let finish_reason = o.finished.map(|f| f.reason.as_str());
                    if o.text.is_empty() && finish_reason.is_none() && o.logprobs.is_empty() {
                        return None;
                    }
                    let lp = st2.loaded().filter(|_| !o.logprobs.is_empty()).map(|m| {
                        let lp = logprobs::completion(m, &o.token_ids, &o.logprobs, offsets[index]);
                        offsets[index] += lp.tokens.iter().map(String::len).sum::<usize>();
                        lp
                    });
                    chunk(vec![CompletionChoice { index, text: o.text.clone(), logprobs: lp, finish_reason }], None)
                }
                Piece::Usage(u) => chunk(vec![], Some(u)),
            };
            serde_json::to_string(&c).ok()
        }));
    }
    let done = collect(streams).await?;
    let usage = usage(done.iter().map(|d| &d.finished));
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(index, d)| CompletionChoice {
            index,
            logprobs: logprobs.map(|_| logprobs::completion(m, &d.token_ids, &d.logprobs, echo.len())),
            text: format!("{echo}{}", d.text),
            finish_reason: Some(d.finished.reason.as_str()),
        })
        .collect();
    Ok(Json(CompletionResponse { id, object: "text_completion", created, model, choices, usage }).into_response())
}
