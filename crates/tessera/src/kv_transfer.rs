//! `--kv-transfer-config`: vLLM's `KVTransferConfig` JSON, which gives a worker its role in
//! prefill/decode disaggregation (`kv_producer`: prefill, `kv_consumer`: decode, `kv_both`).

use std::collections::BTreeMap;

use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Deserialize;
use tessera_engine::kv::transfer::{new_token, KvLayout, KvLink, KvStore};
use tessera_models::ModelConfig;
use tessera_server::KvInfo;

use crate::ServeError;

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

/// Refuse what KV transfer cannot run with yet (before anything is loaded).
pub fn validate(a: &crate::args::ServeArgs) -> Result<(), ServeError> {
    let Some(c) = &a.kv_transfer_config else { return Ok(()) };
    let bad = |m: String| Err(ServeError::Config(m));
    if c.produces() && c.kv_port != 0 && c.kv_port == a.port {
        return bad(format!(
            "kv_port {} is also the HTTP --port; give the KV transfer service its own port",
            c.kv_port
        ));
    }
    for key in c.kv_connector_extra_config.keys() {
        if !["advertise_host", "pin_timeout", "pull_timeout"].contains(&key.as_str()) {
            tracing::warn!("kv_connector_extra_config.{key} is not used by {CONNECTOR}");
        }
    }
    seconds(c, "pin_timeout", 480.0)?;
    seconds(c, "pull_timeout", 30.0)?;
    Ok(())
}

/// A duration from `kv_connector_extra_config` (seconds), or its default.
fn seconds(c: &KvTransferConfig, key: &str, default: f64) -> Result<Duration, ServeError> {
    let v = match c.kv_connector_extra_config.get(key) {
        None => default,
        Some(v) => v.as_f64().filter(|s| s.is_finite() && *s > 0.0).ok_or_else(|| {
            ServeError::Config(format!("kv_connector_extra_config.{key} must be a number of seconds > 0, got {v}"))
        })?,
    };
    Ok(Duration::from_secs_f64(v))
}

/// The address decode workers reach this worker's transfer service at: the config's
/// `advertise_host`, else `$TESSERA_KV_ADVERTISE_HOST`, `$POD_IP`, a specific `kv_ip`, or
/// this host name's first non-loopback address.
fn advertise_host(c: &KvTransferConfig) -> String {
    let configured = c.kv_connector_extra_config.get("advertise_host").and_then(|v| v.as_str()).map(str::to_string);
    let env =
        ["TESSERA_KV_ADVERTISE_HOST", "POD_IP"].iter().find_map(|k| std::env::var(k).ok()).filter(|v| !v.is_empty());
    let ip = c.kv_ip.parse::<IpAddr>().ok().filter(|ip| !ip.is_unspecified()).map(|ip| ip.to_string());
    if let Some(h) = configured.or(env).or(ip) {
        return h;
    }
    let name = std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string();
    let found = (name.as_str(), 0u16)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.find(|a| !a.ip().is_loopback()))
        .map(|a| a.ip().to_string());
    found.unwrap_or_else(|| {
        tracing::warn!(
            "no address to advertise for KV transfer; set POD_IP or TESSERA_KV_ADVERTISE_HOST (using 127.0.0.1)"
        );
        "127.0.0.1".into()
    })
}

/// The store of a replica whose ranks registered their KV memory: shared memory when every
/// rank is a thread here, else the engine's executor (every layer is held by `tp` ranks).
pub(crate) fn ranks_store(
    reg: &crate::ranks::KvRegistry,
    group_size: usize,
    tp: usize,
    cfg: &ModelConfig,
) -> Result<KvStore, ServeError> {
    let mut ranks = std::mem::take(&mut *reg.lock().unwrap_or_else(|p| p.into_inner()));
    ranks.sort_by_key(|r| r.0);
    if group_size > 1 {
        let block_bytes = ranks.first().map_or(0, |r| r.1.block_bytes());
        return Ok(KvStore::Executor { num_layers: tp * cfg.num_layers, block_bytes });
    }
    let ranked = tessera_runner::RankedKv::new(ranks.into_iter().map(|r| r.1).collect())
        .map_err(|e| ServeError::Config(e.to_string()))?;
    Ok(KvStore::Shared(std::sync::Arc::new(ranked)))
}

/// What the HTTP front needs: the roles and the trusted prefillers.
pub fn info(a: &crate::args::ServeArgs, c: &KvTransferConfig) -> KvInfo {
    KvInfo::new((c.produces(), c.consumes()), a.trusted_prefillers.clone())
}

/// The KV link of replica `i` of this pod (data-parallel rank `start + i`: its own engine id
/// and, on a fixed `kv_port`, port `kv_port + rank`).
pub fn link(
    a: &crate::args::ServeArgs,
    c: &KvTransferConfig,
    cfg: &ModelConfig,
    kv_dtype: candle_core::DType,
    store: KvStore,
    i: usize,
) -> Result<KvLink, ServeError> {
    let rank = a.data_parallel_start_rank + i;
    let mut engine_id = c.engine_id.clone().unwrap_or_else(|| format!("tessera-{}", &new_token()[..16]));
    if a.data_parallel_size > 1 {
        engine_id = format!("{engine_id}-dp{rank}");
    }
    let port = if c.kv_port == 0 { 0 } else { c.kv_port.saturating_add(rank as u16) };
    let listener = if c.produces() { Some(std::net::TcpListener::bind((c.kv_ip.as_str(), port))?) } else { None };
    let port = match &listener {
        Some(l) => l.local_addr()?.port(),
        None => c.kv_port,
    };
    let host = advertise_host(c);
    let dtype = match kv_dtype {
        candle_core::DType::F16 => "f16",
        candle_core::DType::BF16 => "bf16",
        candle_core::DType::F32 => "f32",
        other => {
            return Err(ServeError::Config(format!("KV transfer needs an f16, bf16 or f32 KV cache, not {other:?}")))
        }
    };
    let layout = KvLayout {
        model: format!(
            "{} hidden {} vocab {} rope_theta {}",
            cfg.architecture, cfg.hidden_size, cfg.vocab_size, cfg.rope_theta
        ),
        num_layers: cfg.num_layers,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        dtype: dtype.into(),
        block_size: a.block_size,
        tp_size: a.tensor_parallel_size,
        pp_size: a.pipeline_parallel_size,
        rope_interleaved: cfg.rope_interleaved,
    };
    if let Some(l) = &listener {
        tracing::info!(
            "KV transfer ({:?}, engine {engine_id}): serving prefilled blocks on {} as {host}:{port}",
            c.kv_role,
            l.local_addr()?
        );
    } else {
        tracing::info!("KV transfer ({:?}, engine {engine_id}): pulling prefilled blocks", c.kv_role);
    }
    Ok(KvLink {
        engine_id,
        host,
        port,
        layout,
        store,
        listener,
        pin_timeout: seconds(c, "pin_timeout", 480.0)?,
        pull_timeout: seconds(c, "pull_timeout", 30.0)?,
    })
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
