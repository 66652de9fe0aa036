//! CRD generation: the schemas schemars derives from our types, brought to the shape of
//! KServe's controller-gen CRDs, so validation is the same on every cluster. (Bounds are
//! `f64` in `JSONSchemaProps`, so they print as `1.0` where controller-gen prints `1`.)

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{json, Value};

use super::{LLMInferenceService, LLMInferenceServiceConfig};

/// The `LLMInferenceService` CRD.
pub fn service_crd() -> CustomResourceDefinition {
    finish(LLMInferenceService::crd(), |_| {})
}

/// The `LLMInferenceServiceConfig` CRD.
pub fn config_crd() -> CustomResourceDefinition {
    finish(LLMInferenceServiceConfig::crd(), |schema| {
        // KServe's Config CRD embeds an HTTPRoute schema one release older, whose
        // `parentRefs[].namespace` has no pattern; keep it identical.
        let ns = ["spec", "router", "route", "http", "spec", "parentRefs"]
            .iter()
            .try_fold(&mut *schema, |node, key| node.get_mut("properties")?.get_mut(*key))
            .and_then(|n| n.get_mut("items")?.get_mut("properties")?.get_mut("namespace")?.as_object_mut());
        if let Some(ns) = ns {
            ns.remove("pattern");
        }
    })
}

/// Both CRDs as one multi-document YAML (what `tessera-operator crd` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let a = serde_yaml::to_string(&service_crd())?;
    let b = serde_yaml::to_string(&config_crd())?;
    Ok(format!("---\n{a}---\n{b}"))
}

fn finish(mut crd: CustomResourceDefinition, extra: impl FnOnce(&mut Value)) -> CustomResourceDefinition {
    crd.spec.names.list_kind = Some(format!("{}List", crd.spec.names.kind));
    let mut v = serde_json::to_value(&crd).unwrap_or_default();
    if let Some(schema) = v.pointer_mut("/spec/versions/0/schema/openAPIV3Schema") {
        normalise(schema);
        if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert("apiVersion".into(), json!({"type": "string"}));
            props.insert("kind".into(), json!({"type": "string"}));
            props.insert("metadata".into(), json!({"type": "object"}));
        }
        extra(schema);
    }
    serde_json::from_value(v).unwrap_or(crd)
}

/// Rewrites, recursively, what schemars and k8s-openapi express differently from controller-gen.
fn normalise(node: &mut Value) {
    match node {
        Value::Object(obj) => {
            // Optional fields: schemars marks them nullable (and adds `null` to enums);
            // controller-gen leaves optionality to `required`.
            obj.remove("nullable");
            if let Some(Value::Array(values)) = obj.get_mut("enum") {
                if values.iter().any(Value::is_null) {
                    values.retain(|v| !v.is_null());
                }
            }
            // Object references whose name "is allowed to be empty" are not required in
            // KServe's schema (generated from the Go struct tags).
            let empty_name_ok = obj
                .get("properties")
                .and_then(|p| p.get("name"))
                .and_then(|n| n.get("description"))
                .and_then(Value::as_str)
                .is_some_and(|d| d.contains("allowed to be empty"));
            if empty_name_ok {
                if let Some(Value::Array(req)) = obj.get_mut("required") {
                    req.retain(|r| r != "name");
                    if req.is_empty() {
                        obj.remove("required");
                    }
                }
                // `LocalObjectReference`: `+structType=atomic`, name `+default=""`.
                if obj.get("properties").and_then(Value::as_object).is_some_and(|p| p.len() == 1) {
                    obj.insert("x-kubernetes-map-type".into(), json!("atomic"));
                    if let Some(name) = obj.get_mut("properties").and_then(|p| p.get_mut("name")) {
                        name["default"] = json!("");
                    }
                }
            }
            // kube's structural rewriter empties int-or-string's `anyOf` branches; controller-gen
            // (and the API server) keep their types.
            if obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                if let Some(Value::Array(any)) = obj.get_mut("anyOf") {
                    if any.len() == 2 && any.iter().all(|b| b.as_object().is_some_and(|o| o.is_empty())) {
                        *any = vec![json!({"type": "integer"}), json!({"type": "string"})];
                    }
                }
            }
            obj.values_mut().for_each(normalise);
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        _ => {}
    }
}
