//! `POST /tokenize` and `POST /detokenize` (vLLM shapes).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use tessera_protocol::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};

use super::chat::render_messages;
use super::generate::{check_vocab, encode};
use super::parse;
use crate::{ApiError, AppState};

pub(crate) async fn tokenize(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req: TokenizeRequest = parse(body)?;
    let m = st.model()?;
    if let Some(name) = &req.model {
        st.check_name(name)?;
    }
    let (text, add_special) = match (req.prompt, &req.messages) {
        (Some(p), None) => (p, req.add_special_tokens.unwrap_or(true)),
        (None, Some(msgs)) => {
            (render_messages(m, msgs, None, req.add_generation_prompt)?, req.add_special_tokens.unwrap_or(false))
        }
        _ => {
            return Err(ApiError::BadRequest {
                message: "give exactly one of `prompt` and `messages`".into(),
                param: Some("prompt".into()),
            })
        }
    };
    let tokens = encode(m, text, add_special).await?;
    let token_strs = req
        .return_token_strs
        .then(|| tokens.iter().map(|&t| m.tokenizer.id_to_token(t).unwrap_or_default()).collect::<Vec<String>>());
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: m.max_model_len(), tokens, token_strs }))
}

pub(crate) async fn detokenize(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let req: DetokenizeRequest = parse(body)?;
    let m = st.model()?;
    if let Some(name) = &req.model {
        st.check_name(name)?;
    }
    check_vocab(m, &req.tokens, "tokens")?;
    let tok = m.tokenizer.clone();
    let prompt = tokio::task::spawn_blocking(move || tok.decode(&req.tokens, false))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| ApiError::bad(format!("cannot detokenize: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
