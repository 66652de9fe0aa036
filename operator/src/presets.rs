//! The well-known presets (same names as KServe's), shipped in the binary, and which of them a
//! service's topology selects.

use crate::api::{LLMInferenceServiceConfig, LLMInferenceServiceSpec};
use crate::Error;

pub const TEMPLATE: &str = "kserve-config-llm-template";
pub const DECODE_TEMPLATE: &str = "kserve-config-llm-decode-template";
pub const PREFILL_TEMPLATE: &str = "kserve-config-llm-prefill-template";
pub const WORKER_DP: &str = "kserve-config-llm-worker-data-parallel";
pub const DECODE_WORKER_DP: &str = "kserve-config-llm-decode-worker-data-parallel";
pub const PREFILL_WORKER_DP: &str = "kserve-config-llm-prefill-worker-data-parallel";
pub const WORKER_PP: &str = "kserve-config-llm-worker-pipeline-parallel";
pub const DECODE_WORKER_PP: &str = "kserve-config-llm-decode-worker-pipeline-parallel";
pub const PREFILL_WORKER_PP: &str = "kserve-config-llm-prefill-worker-pipeline-parallel";
pub const SCHEDULER: &str = "kserve-config-llm-scheduler";
pub const ROUTER_ROUTE: &str = "kserve-config-llm-router-route";

/// Placeholder in the shipped YAML for the worker image.
const IMAGE_PLACEHOLDER: &str = "TESSERA_IMAGE";

const SHIPPED: &[&str] = &[
    include_str!("../presets/kserve-config-llm-template.yaml"),
    include_str!("../presets/kserve-config-llm-decode-template.yaml"),
    include_str!("../presets/kserve-config-llm-prefill-template.yaml"),
    include_str!("../presets/kserve-config-llm-worker-data-parallel.yaml"),
    include_str!("../presets/kserve-config-llm-decode-worker-data-parallel.yaml"),
    include_str!("../presets/kserve-config-llm-prefill-worker-data-parallel.yaml"),
    include_str!("../presets/kserve-config-llm-worker-pipeline-parallel.yaml"),
    include_str!("../presets/kserve-config-llm-decode-worker-pipeline-parallel.yaml"),
    include_str!("../presets/kserve-config-llm-prefill-worker-pipeline-parallel.yaml"),
    include_str!("../presets/kserve-config-llm-scheduler.yaml"),
    include_str!("../presets/kserve-config-llm-router-route.yaml"),
];

/// Our presets, with `image` as the worker image.
pub fn shipped(image: &str) -> Result<Vec<LLMInferenceServiceConfig>, Error> {
    SHIPPED.iter().map(|y| Ok(serde_yaml::from_str(&y.replace(IMAGE_PLACEHOLDER, image))?)).collect()
}

/// Our presets as one YAML stream (what `tessera-operator presets` prints).
pub fn shipped_yaml(image: &str) -> Result<String, Error> {
    let mut out = String::new();
    for p in shipped(image)? {
        // Keys sorted: the same text whether or not the build orders JSON maps by insertion
        // (serde_json's `preserve_order`, which another crate of the workspace turns on).
        let v = sorted(serde_json::to_value(&p)?);
        out.push_str(&format!("---\n{}", serde_yaml::to_string(&v)?));
    }
    Ok(out)
}

/// `v` with every object's keys in sorted order.
fn sorted(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            let mut entries: Vec<(String, Value)> = o.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn worker_preset(p: Option<&crate::api::ParallelismSpec>, dp: &'static str, pp: &'static str) -> &'static str {
    match p {
        Some(p) if p.pipeline.is_some() && p.data.is_none() => pp,
        _ => dp,
    }
}

/// The well-known presets a spec's topology selects, in merge order (KServe's rules).
pub fn for_topology(spec: &LLMInferenceServiceSpec) -> Vec<&'static str> {
    let mut out = vec![];
    if let Some(router) = &spec.router {
        if router.scheduler.is_some() && router.pool_ref().is_none() {
            out.push(SCHEDULER);
        }
        if router.managed_route() {
            out.push(ROUTER_ROUTE);
        }
    }
    let w = &spec.workload;
    match &spec.prefill {
        None if w.worker.is_none() => out.push(TEMPLATE),
        None => out.push(worker_preset(w.parallelism.as_ref(), WORKER_DP, WORKER_PP)),
        Some(prefill) => {
            out.push(match w.worker {
                None => DECODE_TEMPLATE,
                Some(_) => worker_preset(w.parallelism.as_ref(), DECODE_WORKER_DP, DECODE_WORKER_PP),
            });
            out.push(match prefill.worker {
                None => PREFILL_TEMPLATE,
                Some(_) => worker_preset(prefill.parallelism.as_ref(), PREFILL_WORKER_DP, PREFILL_WORKER_PP),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_preset_parses_and_has_its_image() {
        let presets = shipped("registry/tessera:1").unwrap();
        assert_eq!(presets.len(), 11);
        for p in &presets {
            let y = serde_yaml::to_string(p).unwrap();
            assert!(!y.contains(IMAGE_PLACEHOLDER), "{y}");
        }
        let t = presets.iter().find(|p| p.metadata.name.as_deref() == Some(TEMPLATE)).unwrap();
        let c = &t.spec.spec.workload.template.as_ref().unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("registry/tessera:1"));
        assert_eq!(c.command.as_deref(), Some(&["tessera".to_string(), "serve".into(), "/mnt/models".into()][..]));
    }

    #[test]
    fn topology_selects_presets() {
        let spec = |y: &str| -> LLMInferenceServiceSpec { serde_yaml::from_str(y).unwrap() };
        assert_eq!(for_topology(&spec("model: {uri: x}")), [TEMPLATE]);
        assert_eq!(for_topology(&spec("{model: {uri: x}, router: {route: {}}}")), [ROUTER_ROUTE, TEMPLATE]);
        assert_eq!(
            for_topology(&spec("{model: {uri: x}, router: {scheduler: {}, route: {http: {refs: [{name: r}]}}}}")),
            [SCHEDULER, TEMPLATE]
        );
        assert_eq!(for_topology(&spec("{model: {uri: x}, worker: {}, parallelism: {data: 2}}")), [WORKER_DP]);
        assert_eq!(for_topology(&spec("{model: {uri: x}, worker: {}, parallelism: {pipeline: 2}}")), [WORKER_PP]);
        assert_eq!(for_topology(&spec("{model: {uri: x}, prefill: {}}")), [DECODE_TEMPLATE, PREFILL_TEMPLATE]);
        assert_eq!(
            for_topology(&spec("{model: {uri: x}, prefill: {worker: {}}, worker: {}}")),
            [DECODE_WORKER_DP, PREFILL_WORKER_DP]
        );
        assert_eq!(
            for_topology(&spec(
                "{model: {uri: x}, prefill: {worker: {}, parallelism: {pipeline: 2}}, worker: {}, parallelism: {pipeline: 2}}"
            )),
            [DECODE_WORKER_PP, PREFILL_WORKER_PP]
        );
    }
}
