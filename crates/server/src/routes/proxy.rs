//! The decode worker as its own llm-d routing sidecar: a request carrying
//! `x-prefiller-host-port` (and no `kv_transfer_params` yet) first goes to that prefill
//! worker as a one-token prefill leg; its answer's `kv_transfer_params` then make the request
//! here a decode leg. Only prefill workers named in `--trusted-prefillers` are contacted.

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::{json, Value};
use tessera_engine::kv::transfer::Fallback;
use tessera_protocol::{KvTransferParams, SamplingParams};

use crate::state::ServedModel;
use crate::ApiError;

/// The header llm-d's scheduler sets (and its older name).
const HEADERS: [&str; 2] = ["x-prefiller-host-port", "x-prefiller-url"];
/// Waits before the retries of a prefill leg answered 502/503/504 or not reached.
const BACKOFF_MS: [u64; 3] = [100, 200, 400];

/// `host:port` of a header value (`http://` prefix allowed, IPv6 in brackets).
fn host_port(v: &str) -> Option<(String, u16)> {
    let v = v.trim().trim_start_matches("http://").trim_end_matches('/');
    let (host, port) = v.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && !host.contains('/')).then_some(())?;
    Some((host.to_ascii_lowercase(), port.parse().ok()?))
}

/// Whether `--trusted-prefillers` admits `host:port`: an entry names the host (any port) or
/// `host:port`; a DNS name also admits every address it resolves to.
async fn trusted(list: &[String], host: &str, port: u16) -> bool {
    let ip = host.parse::<IpAddr>().ok();
    for entry in list {
        let (h, p) = match host_port(entry) {
            Some((h, p)) => (h, Some(p)),
            None => (entry.trim().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase(), None),
        };
        if p.is_some_and(|p| p != port) {
            continue;
        }
        if h == host {
            return true;
        }
        if let (Some(ip), Err(_)) = (ip, h.parse::<IpAddr>()) {
            if let Ok(addrs) = tokio::net::lookup_host((h.as_str(), 0)).await {
                if addrs.into_iter().any(|a| a.ip() == ip) {
                    return true;
                }
            }
        }
    }
    false
}

/// The prefill leg's body, shaped as llm-d's sidecar shapes it.
fn prefill_body(raw: &Bytes) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(raw).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
    let o = v.as_object_mut().ok_or_else(|| ApiError::bad("the request body must be a JSON object"))?;
    o.remove("stream_options");
    o.insert("stream".into(), json!(false));
    o.insert("max_tokens".into(), json!(1));
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
    o.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    Ok(v)
}

/// If this request is to be split here, run its prefill leg and return the decode leg's
/// `kv_transfer_params` (`None`: run the request as it is).
pub(crate) async fn prefill_first(
    m: &ServedModel,
    headers: &HeaderMap,
    path: &str,
    raw: &Bytes,
    params: &SamplingParams,
    given: Option<&KvTransferParams>,
) -> Result<Option<KvTransferParams>, ApiError> {
    let Some((name, value)) = HEADERS.iter().find_map(|h| headers.get(*h).map(|v| (*h, v))) else {
        return Ok(None);
    };
    // Behind llm-d's own sidecar the header stays on the decode leg, which already carries
    // the prefill's params; a worker that does not decode never proxies.
    let Some(info) = m.kv.as_ref().filter(|k| k.consumes && given.is_none()) else {
        return Ok(None);
    };
    let value = value.to_str().unwrap_or_default();
    let (host, port) = host_port(value)
        .ok_or_else(|| ApiError::BadRequest { message: format!("{name} `{value}` is not host:port"), param: None })?;
    if !trusted(&info.trusted_prefillers, &host, port).await {
        return Err(ApiError::Forbidden(format!(
            "{name} `{value}` is not a trusted prefill worker (start the decode worker with --trusted-prefillers)"
        )));
    }
    let stats = &m.generator()?.stats().kv;
    if params.n > 1 || params.prompt_logprobs.is_some() {
        stats.fallback(Fallback::Unsupported);
        return Ok(None);
    }
    let body = prefill_body(raw)?;
    let rid = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| super::request_id("pd"), str::to_string);
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let url = format!("http://{host}:{port}{path}");
    for (attempt, wait) in BACKOFF_MS.iter().map(Some).chain([None]).enumerate() {
        let sent = info.http.post(&url).header("x-request-id", &rid).json(&body).send().await;
        let retry = match sent {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.map_err(|e| ApiError::Internal(format!("prefill leg answer: {e}")))?;
                let kv = v.get("kv_transfer_params").cloned().unwrap_or(Value::Null);
                // A prefill worker that returned no params: the decode side computes the prompt.
                return Ok(Some(serde_json::from_value(kv).unwrap_or_default()));
            }
            Ok(r) if matches!(r.status().as_u16(), 502..=504) => format!("{url} answered {}", r.status()),
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.bytes().await.unwrap_or_default();
                return Err(ApiError::Upstream { status, body });
            }
            Err(e) => format!("{url}: {e}"),
        };
        match wait {
            Some(ms) => {
                tracing::info!("prefill leg {rid} attempt {}: {retry}; retrying", attempt + 1);
                tokio::time::sleep(Duration::from_millis(*ms)).await;
            }
            None => tracing::warn!("prefill leg {rid} failed ({retry}); computing the prompt here"),
        }
    }
    stats.fallback(Fallback::PrefillLeg);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_parse_as_the_sidecar_writes_them() {
        assert_eq!(host_port("10.0.0.7:8000"), Some(("10.0.0.7".into(), 8000)));
        assert_eq!(host_port("http://Prefill-0.svc:8200/"), Some(("prefill-0.svc".into(), 8200)));
        assert_eq!(host_port("[fd00::1]:8000"), Some(("fd00::1".into(), 8000)));
        for bad in ["10.0.0.7", "host:port", ":80", "a/b:80"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn only_listed_hosts_or_names_resolving_to_them_are_trusted() {
        let list = vec!["10.0.0.7".to_string(), "prefill.example:9000".into(), "localhost".into()];
        assert!(trusted(&list, "10.0.0.7", 1234).await, "a host entry admits any port");
        assert!(trusted(&list, "prefill.example", 9000).await);
        assert!(!trusted(&list, "prefill.example", 9001).await, "a host:port entry admits that port only");
        assert!(trusted(&list, "127.0.0.1", 8000).await, "a name admits its addresses");
        assert!(!trusted(&list, "10.0.0.8", 8000).await);
        assert!(!trusted(&[], "10.0.0.7", 8000).await, "nothing is trusted by default");
    }
}
