//! `POST /v1/embeddings` on an embedding model (`--task embed`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use tessera_protocol::{EmbeddingData, EmbeddingItem, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage};

use super::generate::{check_vocab, encode};
use super::{parse, request_id};
use crate::state::unix_now;
use crate::{ApiError, AppState};

pub(crate) async fn handle(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    let req: EmbeddingRequest = parse(body)?;
    let m = st.model()?;
    st.check_name(&req.model)?;
    let embedder = m.embedder.as_ref().ok_or_else(|| ApiError::BadRequest {
        message: "this model generates text; embeddings need a model served with --task embed".into(),
        param: Some("model".into()),
    })?;
    let base64 = req.base64()?;
    if let Some(d) = req.dimensions {
        if d != embedder.dims() as i64 {
            return Err(ApiError::BadRequest {
                message: format!(
                    "this model gives {}-dimensional embeddings and is not a Matryoshka model: `dimensions` must be \
                     {0} or absent",
                    embedder.dims()
                ),
                param: Some("dimensions".into()),
            });
        }
    }
    let mut inputs = Vec::new();
    for item in req.items()? {
        let ids = match item {
            EmbeddingItem::Text(t) => encode(m, t, true).await?,
            EmbeddingItem::Ids(ids) => {
                check_vocab(m, &ids, "input")?;
                ids
            }
        };
        if ids.len() > embedder.max_tokens() {
            return Err(ApiError::BadRequest {
                message: format!(
                    "This model's maximum input length is {} tokens; an input has {}.",
                    embedder.max_tokens(),
                    ids.len()
                ),
                param: Some("input".into()),
            });
        }
        inputs.push(ids);
    }
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = embedder
        .embed(inputs)
        .await
        .map_err(|_| ApiError::Internal("the embedding worker stopped".into()))?
        .map_err(ApiError::Internal)?;
    let data = vectors.iter().enumerate().map(|(i, v)| EmbeddingData::new(i, v, base64)).collect();
    Ok(Json(EmbeddingResponse {
        id: request_id("embd"),
        object: "list",
        created: unix_now(),
        model: req.model,
        data,
        usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
    }))
}
