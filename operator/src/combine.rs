//! The effective spec of a service: well-known presets by topology, then each `baseRefs`
//! config in order, then the service's own spec (strategic merge, later wins), with Go-template
//! variables rendered; then validated against the contract's rules.

use std::collections::BTreeSet;

use kube::ResourceExt;
use serde_json::{json, Value};

use crate::api::{
    LLMInferenceService, LLMInferenceServiceConfig, LLMInferenceServiceSpec, ParallelismSpec, WorkloadSpec,
};
use crate::merge::merge_spec;
use crate::presets;
use crate::template::{GlobalConfig, Renderer};
use crate::Error;

/// Names of the configs a service merges, in order: presets first, then its `baseRefs`.
pub fn config_names(svc: &LLMInferenceService) -> Vec<String> {
    let mut names: Vec<String> = presets::for_topology(&svc.spec).into_iter().map(String::from).collect();
    names.extend(svc.spec.base_refs.iter().flatten().map(|r| r.name.clone()));
    names
}

/// Merge `configs` (in [`config_names`] order) and the service's spec; render and validate.
pub fn combine(
    svc: &LLMInferenceService,
    configs: &[LLMInferenceServiceConfig],
    global: &GlobalConfig,
) -> Result<LLMInferenceServiceSpec, Error> {
    let mut merged = json!({});
    for cfg in configs {
        if cfg.spec.spec.base_refs.as_ref().is_some_and(|r| !r.is_empty()) {
            return Err(Error::Invalid(format!(
                "LLMInferenceServiceConfig {:?} sets baseRefs; only an LLMInferenceService may reference configs",
                cfg.name_any()
            )));
        }
        merge_spec(&mut merged, &serde_json::to_value(&cfg.spec.spec)?);
    }
    let mut own = serde_json::to_value(&svc.spec)?;
    if let Some(o) = own.as_object_mut() {
        o.remove("baseRefs");
    }
    merge_spec(&mut merged, &own);
    if merged.pointer("/model/name").and_then(Value::as_str).is_none_or(str::is_empty) {
        merged["model"]["name"] = json!(svc.name_any());
    }
    let meta = json!({
        "name": svc.name_any(),
        "namespace": svc.namespace().unwrap_or_default(),
        "labels": svc.labels(),
        "annotations": svc.annotations(),
        "generation": svc.metadata.generation,
    });
    let parse = |v: Value| -> Result<LLMInferenceServiceSpec, Error> {
        serde_json::from_value(v).map_err(|e| Error::Invalid(format!("the merged spec does not parse: {e}")))
    };
    // Structure first (a worker without parallelism would otherwise fail as a template error
    // in the multi-node presets), then the rendered strings.
    validate(&parse(merged.clone())?)?;
    let renderer = Renderer::new(&meta, &merged, global);
    renderer.render_json(&mut merged)?;
    let spec = parse(merged)?;
    validate(&spec)?;
    Ok(spec)
}

fn check_parallelism(what: &str, w: &WorkloadSpec) -> Result<(), Error> {
    let p = w.parallelism.clone().unwrap_or_default();
    let ParallelismSpec { tensor, pipeline, data, data_local, data_rpc_port, .. } = p;
    for (name, v) in [("tensor", tensor), ("pipeline", pipeline), ("data", data), ("dataLocal", data_local)] {
        if let Some(v) = v.filter(|v| *v < 1) {
            return Err(Error::Invalid(format!("{what}parallelism.{name} is {v}; degrees must be at least 1")));
        }
    }
    if let Some(port) = data_rpc_port.filter(|p| !(1..=65535).contains(p)) {
        return Err(Error::Invalid(format!("{what}parallelism.dataRPCPort is {port}; it must be in 1..65535")));
    }
    if pipeline.is_some() && data.is_some() {
        return Err(Error::Invalid(format!(
            "{what}parallelism sets both pipeline and data; use one of them for a multi-node workload"
        )));
    }
    if data.is_some() != data_local.is_some() {
        return Err(Error::Invalid(format!(
            "{what}parallelism.data and {what}parallelism.dataLocal must be set together"
        )));
    }
    if w.worker.is_some() && pipeline.is_none() && data.is_none() {
        return Err(Error::Invalid(format!(
            "{what}worker is set, which makes the workload multi-node, but {what}parallelism has neither data nor \
             pipeline; set one of them (or remove {what}worker for a single-node workload)"
        )));
    }
    if let Some(r) = w.replicas.filter(|r| *r < 0) {
        return Err(Error::Invalid(format!("{what}replicas is {r}; it must be at least 0")));
    }
    Ok(())
}

/// The contract's rules that apply to a merged spec.
pub fn validate(spec: &LLMInferenceServiceSpec) -> Result<(), Error> {
    if spec.model.uri.is_empty() {
        return Err(Error::Invalid("spec.model.uri is empty; set the model's storage URI".into()));
    }
    check_parallelism("spec.", &spec.workload)?;
    if let Some(p) = &spec.prefill {
        check_parallelism("spec.prefill.", p)?;
    }
    let http = spec.router.as_ref().and_then(|r| r.route.as_ref()).and_then(|r| r.http.as_ref());
    if http.is_some_and(|h| h.refs.as_ref().is_some_and(|r| !r.is_empty()) && h.spec.is_some()) {
        return Err(Error::Invalid("spec.router.route.http sets both refs and spec; they are exclusive".into()));
    }
    let model_name = spec.model.name.clone().unwrap_or_default();
    let mut seen = BTreeSet::new();
    for a in spec.model.lora.iter().flat_map(|l| l.adapters.iter().flatten()) {
        let name = a.name.clone().unwrap_or_default();
        let bad = match name.as_str() {
            "" => Some("is empty"),
            "." | ".." => Some("is not a valid adapter name"),
            n if n.contains(['/', ',', '=']) || n.chars().any(char::is_whitespace) => {
                Some("may not contain '/', ',', '=' or spaces (it names a folder and a flag value)")
            }
            n if n == model_name => Some("is the model's own name"),
            n if !seen.insert(n.to_string()) => Some("is used by two adapters"),
            _ => None,
        };
        if let Some(why) = bad {
            return Err(Error::Invalid(format!(
                "spec.model.lora adapter name {name:?} {why}; adapter names must be unique"
            )));
        }
    }
    let adapters = spec.model.lora.iter().flat_map(|l| l.adapters.iter().flatten());
    if let Some((i, a)) = adapters.enumerate().find(|(_, a)| a.uri.as_deref().is_none_or(str::is_empty)) {
        return Err(Error::Invalid(format!(
            "spec.model.lora.adapters[{i}] ({:?}) has no uri; set the adapter's storage URI",
            a.name.clone().unwrap_or_default()
        )));
    }
    Ok(())
}
