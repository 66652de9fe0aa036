//! `--kv-transfer-config`: vLLM's `KVTransferConfig` JSON, which gives a worker its role in
//! prefill/decode disaggregation (`kv_producer`: prefill, `kv_consumer`: decode, `kv_both`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// The connector Tessera implements; vLLM's `NixlConnector` (what KServe's samples name) is
/// taken as the same thing, with a warning.
pub const CONNECTOR: &str = "TesseraConnector";
/// vLLM's default KV port.
pub const DEFAULT_KV_PORT: u16 = 14579;

/// A worker's part in prefill/decode disaggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvRole {
    /// Prefills requests and hands their KV blocks out.
    KvProducer,
    /// Pulls prefilled KV blocks and decodes.
    KvConsumer,
    /// Either, request by request.
    KvBoth,
}

/// The parsed flag: vLLM's field names, unknown fields refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvTransferConfig {
    pub kv_connector: String,
    pub kv_role: KvRole,
    /// This worker's id in `remote_engine_id` (default: generated at start-up).
    #[serde(default)]
    pub engine_id: Option<String>,
    /// Address the block-transfer service listens on.
    #[serde(default = "default_ip")]
    pub kv_ip: String,
    /// Port of the block-transfer service (0: any free port).
    #[serde(default = "default_port")]
    pub kv_port: u16,
    #[serde(default)]
    pub kv_connector_extra_config: BTreeMap<String, serde_json::Value>,
    // vLLM fields accepted and unused (device buffers, NCCL-connector ranks, module paths).
    #[serde(default)]
    pub kv_buffer_device: Option<String>,
    #[serde(default)]
    pub kv_buffer_size: Option<f64>,
    #[serde(default)]
    pub kv_rank: Option<u32>,
    #[serde(default)]
    pub kv_parallel_size: Option<u32>,
    #[serde(default)]
    pub kv_connector_module_path: Option<String>,
    #[serde(default)]
    pub enable_permute_local_kv: Option<bool>,
    #[serde(default)]
    pub kv_load_failure_policy: Option<String>,
}

fn default_ip() -> String {
    "0.0.0.0".into()
}

fn default_port() -> u16 {
    DEFAULT_KV_PORT
}

impl KvTransferConfig {
    /// Whether this worker serves prefill legs (`do_remote_decode`).
    pub fn produces(&self) -> bool {
        matches!(self.kv_role, KvRole::KvProducer | KvRole::KvBoth)
    }

    /// Whether this worker takes decode legs (`do_remote_prefill`) and proxies
    /// `x-prefiller-host-port`.
    pub fn consumes(&self) -> bool {
        matches!(self.kv_role, KvRole::KvConsumer | KvRole::KvBoth)
    }
}

/// The flag's parser (clap reports an error naming the flag and exits 2).
pub fn parse(s: &str) -> Result<KvTransferConfig, String> {
    let c: KvTransferConfig = serde_json::from_str(s).map_err(|e| {
        format!(
            "not a KV transfer config ({e}); expected JSON such as \
            '{{\"kv_connector\":\"{CONNECTOR}\",\"kv_role\":\"kv_producer\"}}'"
        )
    })?;
    match c.kv_connector.as_str() {
        CONNECTOR | "NixlConnector" => {}
        other => {
            return Err(format!(
                "kv_connector `{other}` is not available: Tessera moves KV blocks with `{CONNECTOR}` \
                 (`NixlConnector` is accepted as the same)"
            ))
        }
    }
    if c.kv_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("kv_ip `{}` is not an IP address", c.kv_ip));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_presets_and_kserve_samples_parse() {
        let p = parse(r#"{"kv_connector":"TesseraConnector","kv_role":"kv_producer"}"#).unwrap();
        assert!(p.produces() && !p.consumes());
        assert_eq!((p.kv_ip.as_str(), p.kv_port), ("0.0.0.0", DEFAULT_KV_PORT));
        let d = parse(r#"{"kv_connector":"TesseraConnector","kv_role":"kv_consumer","kv_port":0}"#).unwrap();
        assert!(d.consumes() && !d.produces() && d.kv_port == 0);
        let both = parse(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cuda"}"#).unwrap();
        assert!(both.consumes() && both.produces());
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        for (json, needle) in [
            (r#"{"kv_connector":"TesseraConnector","kv_role":"kv_prefill"}"#, "kv_prefill"),
            (r#"{"kv_connector":"TesseraConnector"}"#, "kv_role"),
            (r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#, "LMCacheConnectorV1"),
            (r#"{"kv_connector":"TesseraConnector","kv_role":"kv_both","kv_portt":1}"#, "kv_portt"),
            (r#"{"kv_connector":"TesseraConnector","kv_role":"kv_both","kv_ip":"pod-a"}"#, "pod-a"),
            ("kv_producer", "expected JSON"),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
