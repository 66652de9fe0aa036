//! llm-d's `kv_transfer_params` (vLLM's KV-connector fields) on a request: what the routing
//! sidecar sends on each leg of a prefill/decode split.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ProtocolError;

/// Every field is optional: the sidecar's prefill leg sends the remote fields as nulls.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct KvTransferParams {
    pub do_remote_decode: Option<bool>,
    pub do_remote_prefill: Option<bool>,
    pub remote_engine_id: Option<String>,
    /// A list of block ids (newer vLLM: one list per KV-cache group), kept as sent.
    pub remote_block_ids: Option<Value>,
    pub remote_host: Option<String>,
    pub remote_port: Option<u16>,
    pub tp_size: Option<u32>,
    /// Fields of other connectors, passed through untouched.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// What a request asks of this worker's KV.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvIntent {
    /// An ordinary request (`kv_transfer_params` absent or null).
    #[default]
    Local,
    /// The prefill leg: prefill, answer one token, keep the blocks for the decode worker.
    RemoteDecode,
    /// The decode leg: the prompt's blocks are on the prefill worker named in the params.
    RemotePrefill,
}

impl KvTransferParams {
    /// The leg this is; both flags at once is a 400 naming the field.
    pub fn intent(p: Option<&Self>) -> Result<KvIntent, ProtocolError> {
        let Some(p) = p else { return Ok(KvIntent::Local) };
        match (p.do_remote_decode.unwrap_or(false), p.do_remote_prefill.unwrap_or(false)) {
            (true, true) => Err(ProtocolError::param(
                "kv_transfer_params",
                "`kv_transfer_params` cannot ask for both `do_remote_decode` and `do_remote_prefill`",
            )),
            (true, false) => Ok(KvIntent::RemoteDecode),
            (false, true) => Ok(KvIntent::RemotePrefill),
            (false, false) => Ok(KvIntent::Local),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommonParams, ModelDefaults, SamplingParams};

    fn common(json: &str) -> CommonParams {
        serde_json::from_str(json).expect("parses")
    }

    #[test]
    fn the_sidecars_legs_parse_and_the_prefill_leg_answers_one_token() {
        // The prefill leg as llm-d's sidecar sends it (remote fields null), with a larger limit
        // left over from the original chat request.
        let leg = common(
            r#"{"max_tokens": 1, "min_tokens": 5, "kv_transfer_params": {"do_remote_decode": true,
                "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null,
                "remote_host": null, "remote_port": null}}"#,
        );
        let p = SamplingParams::from_common(&leg, Some(200), None, &ModelDefaults::default()).unwrap();
        assert_eq!((p.kv, p.max_tokens, p.min_tokens), (KvIntent::RemoteDecode, Some(1), 0));
        // The decode leg carries the prefill's params back; a connector's own fields pass through.
        let decode = common(
            r#"{"kv_transfer_params": {"do_remote_prefill": true, "remote_block_ids": [[3, 4]],
                "remote_host": "10.0.0.7", "remote_port": 14579, "tp_size": 1, "transfer_token": "ab"}}"#,
        );
        let p = SamplingParams::from_common(&decode, Some(20), None, &ModelDefaults::default()).unwrap();
        assert_eq!((p.kv, p.max_tokens), (KvIntent::RemotePrefill, Some(20)));
        let kv = decode.kv_transfer_params.expect("params");
        assert_eq!(kv.extra.get("transfer_token"), Some(&Value::from("ab")));
        // Null or absent: an ordinary request.
        for body in [r#"{"kv_transfer_params": null}"#, "{}"] {
            let p = SamplingParams::from_common(&common(body), Some(9), None, &ModelDefaults::default()).unwrap();
            assert_eq!((p.kv, p.max_tokens), (KvIntent::Local, Some(9)));
        }
    }

    #[test]
    fn contradictory_or_mistyped_params_are_refused() {
        let both = common(r#"{"kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": true}}"#);
        let e = SamplingParams::from_common(&both, None, None, &ModelDefaults::default()).unwrap_err();
        assert!(format!("{e:?}").contains("kv_transfer_params"), "{e:?}");
        assert!(serde_json::from_str::<CommonParams>(r#"{"kv_transfer_params": {"do_remote_decode": "yes"}}"#).is_err());
    }
}
