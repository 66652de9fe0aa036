//! The two legs of prefill/decode disaggregation as llm-d sends them: the prefill leg
//! (`kv_transfer_params.do_remote_decode`) answers with where its KV waits; the decode leg
//! (`do_remote_prefill`) names where to pull it from.

use serde_json::{json, Value};
use tessera_engine::kv::transfer::{Fallback, PinnedKv, RemoteSource};
use tessera_protocol::{KvIntent, KvTransferParams, SamplingParams};

use crate::state::ServedModel;
use crate::ApiError;

fn bad(message: String) -> ApiError {
    ApiError::BadRequest { message, param: Some("kv_transfer_params".into()) }
}

/// Check a request's leg against this worker's role; for a decode leg that can pull, where
/// from (`None`: an ordinary request, or a decode leg that computes its prompt here).
pub(crate) fn leg(
    m: &ServedModel,
    kv: Option<&KvTransferParams>,
    params: &SamplingParams,
    stream: bool,
    prompt_len: usize,
) -> Result<Option<RemoteSource>, ApiError> {
    let role = |what: &str, role: &str| {
        bad(format!(
            "this worker does not serve {what}: start it with --kv-transfer-config \
             '{{\"kv_connector\":\"TesseraConnector\",\"kv_role\":\"{role}\"}}' (or kv_both)"
        ))
    };
    match params.kv {
        KvIntent::Local => Ok(None),
        KvIntent::RemoteDecode => {
            if !m.kv.as_ref().is_some_and(|k| k.produces) {
                return Err(role("prefill legs (`do_remote_decode`)", "kv_producer"));
            }
            if stream || params.n > 1 {
                return Err(bad("a prefill leg (`do_remote_decode`) answers one choice, not streamed".into()));
            }
            Ok(None)
        }
        KvIntent::RemotePrefill => {
            if !m.kv.as_ref().is_some_and(|k| k.consumes) {
                return Err(role("decode legs (`do_remote_prefill`)", "kv_consumer"));
            }
            let stats = &m.generator()?.stats().kv;
            if params.prompt_logprobs.is_some() || params.n > 1 {
                // Every prompt position (or every choice's blocks) is needed here.
                stats.fallback(Fallback::Unsupported);
                return Ok(None);
            }
            match kv.and_then(|p| source(p, prompt_len)) {
                Some(src) => Ok(Some(src)),
                None => {
                    tracing::warn!("a decode leg's kv_transfer_params name no usable prefill; computing its prompt");
                    stats.fallback(Fallback::PullFailed);
                    Ok(None)
                }
            }
        }
    }
}

/// The pull source in a decode leg's params, if they are complete and for this prompt.
fn source(p: &KvTransferParams, prompt_len: usize) -> Option<RemoteSource> {
    let ids = match p.remote_block_ids.as_ref()? {
        // Newer vLLM sends one list per KV-cache group; there is one group here.
        Value::Array(groups) if groups.first().is_some_and(Value::is_array) => groups.first()?.clone(),
        ids => ids.clone(),
    };
    let block_ids: Vec<u32> = serde_json::from_value(ids).ok()?;
    let token = p.extra.get("transfer_token")?.as_str()?.to_string();
    let num_tokens = p.extra.get("remote_num_tokens").and_then(Value::as_u64).map_or(prompt_len, |n| n as usize);
    let (host, port) = (p.remote_host.clone()?, p.remote_port?);
    (num_tokens == prompt_len).then(|| RemoteSource {
        host,
        port,
        engine_id: p.remote_engine_id.clone(),
        block_ids,
        token,
        num_tokens,
    })
}

/// The prefill leg's `kv_transfer_params` answer (what vLLM's connectors return, plus the
/// token that unlocks the blocks and the prompt length they hold).
pub(crate) fn response(pinned: Option<&PinnedKv>) -> Option<Value> {
    let p = pinned?;
    Some(json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": p.block_ids,
        "remote_engine_id": p.engine_id,
        "remote_host": p.host,
        "remote_port": p.port,
        "tp_size": p.tp_size,
        "transfer_token": p.token,
        "remote_num_tokens": p.num_tokens,
    }))
}
