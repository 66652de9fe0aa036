//! `POST /v1/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_protocol::{
    CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, Prompt, SamplingParams,
};

use super::generate::{collect, encode, sse, submit, usage, Piece};
use super::{parse, request_id};
use crate::state::unix_now;
use crate::{ApiError, AppState};

pub(crate) async fn handle(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let m = st.model()?;
    st.check_name(&req.model)?;
    let params = SamplingParams::from_common(&req.common, req.common.max_tokens, &m.defaults)?;
    let prompt = match req.prompt {
        Prompt::Text(s) => encode(m, s, true).await?,
        Prompt::Tokens(t) => t,
        Prompt::TextBatch(mut v) if v.len() == 1 => encode(m, v.remove(0), true).await?,
        Prompt::TokenBatch(mut v) if v.len() == 1 => v.remove(0),
        _ => {
            return Err(ApiError::BadRequest {
                message: "batched prompts are not supported; send one prompt per request".into(),
                param: Some("prompt".into()),
            })
        }
    };
    let rs = submit(m, prompt, params)?;
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
        return Ok(sse(rs, vec![], include_usage, move |p| {
            let c = match p {
                Piece::Output(o) => {
                    let finish_reason = o.finished.map(|f| f.reason.as_str());
                    if o.text.is_empty() && finish_reason.is_none() {
                        return None;
                    }
                    chunk(
                        vec![CompletionChoice { index: 0, text: o.text.clone(), logprobs: None, finish_reason }],
                        None,
                    )
                }
                Piece::Usage(u) => chunk(vec![], Some(u)),
            };
            serde_json::to_string(&c).ok()
        }));
    }
    let done = collect(rs).await?;
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices: vec![CompletionChoice {
            index: 0,
            text: done.text,
            logprobs: None,
            finish_reason: Some(done.finished.reason.as_str()),
        }],
        usage: usage(&done.finished),
    })
    .into_response())
}
