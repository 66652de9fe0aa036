//! Our generated CRDs against KServe's (vendored in `operator/tests/fixtures/kserve/crd`): every
//! field path of theirs exists in ours with the same type, enum, bounds, required-ness and
//! Kubernetes extensions; names, scope, short names, printer columns and subresources match.
//! (`operator/tests/install.rs` keeps the committed copy in `operator/install/crds.yaml` current.)

use serde_json::Value;
use tessera_operator::api::{config_crd, service_crd};

const CHECKED: &[&str] = &[
    "type",
    "enum",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-map-type",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-embedded-resource",
    "anyOf",
    "default",
    "nullable",
];

fn reference(file: &str) -> Value {
    let p = format!("{}/tests/fixtures/kserve/crd/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    serde_yaml::from_str(&text).expect("reference CRD parses")
}

/// Walk the reference schema; collect every difference from ours.
fn compare(theirs: &Value, ours: &Value, path: &str, out: &mut Vec<String>) {
    for key in CHECKED {
        let (t, o) = (theirs.get(*key), ours.get(*key));
        let same_number =
            matches!((t.and_then(Value::as_f64), o.and_then(Value::as_f64)), (Some(a), Some(b)) if a == b);
        if t != o && !same_number {
            out.push(format!("{path}: {key} is {o:?} in ours, {t:?} in KServe's"));
        }
    }
    let req = |v: &Value| {
        let mut r: Vec<String> = v
            .get("required")
            .and_then(|r| r.as_array())
            .map_or(vec![], |a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect());
        r.sort();
        r
    };
    if req(theirs) != req(ours) {
        out.push(format!("{path}: required is {:?} in ours, {:?} in KServe's", req(ours), req(theirs)));
    }
    if let Some(props) = theirs.get("properties").and_then(|p| p.as_object()) {
        for (k, t) in props {
            match ours.get("properties").and_then(|p| p.get(k)) {
                Some(o) => compare(t, o, &format!("{path}.{k}"), out),
                None => out.push(format!("{path}.{k}: missing in ours")),
            }
        }
    }
    if let Some(t) = theirs.get("items") {
        match ours.get("items") {
            Some(o) => compare(t, o, &format!("{path}[]"), out),
            None => out.push(format!("{path}[]: items missing in ours")),
        }
    }
    if let Some(t) = theirs.get("additionalProperties").filter(|v| v.is_object()) {
        match ours.get("additionalProperties") {
            Some(o) => compare(t, o, &format!("{path}{{*}}"), out),
            None => out.push(format!("{path}{{*}}: additionalProperties missing in ours")),
        }
    }
}

fn check(ours: Value, theirs: Value) {
    let mut diffs = vec![];
    for key in ["group", "scope", "names"] {
        if ours["spec"][key] != theirs["spec"][key] {
            diffs.push(format!("spec.{key}: {} vs {}", ours["spec"][key], theirs["spec"][key]));
        }
    }
    let (ov, tv) = (&ours["spec"]["versions"][0], &theirs["spec"]["versions"][0]);
    for key in ["name", "served", "storage", "subresources", "additionalPrinterColumns"] {
        if ov[key] != tv[key] {
            diffs.push(format!("versions[0].{key}: {} vs {}", ov[key], tv[key]));
        }
    }
    // One deliberate deviation: ours requires `spec` (KServe's does not), so a spec-less object
    // is refused at admission with "spec: Required value" instead of failing every reconcile.
    let mut ours_schema = ov["schema"]["openAPIV3Schema"].clone();
    assert_eq!(ours_schema["required"], serde_json::json!(["spec"]));
    ours_schema.as_object_mut().map(|o| o.remove("required"));
    compare(&tv["schema"]["openAPIV3Schema"], &ours_schema, "", &mut diffs);
    assert!(diffs.is_empty(), "{} differences:\n{}", diffs.len(), diffs.join("\n"));
}

#[test]
fn llminferenceservice_crd_matches_kserve() {
    check(serde_json::to_value(service_crd()).unwrap(), reference("serving.kserve.io_llminferenceservices.yaml"));
}

#[test]
fn llminferenceserviceconfig_crd_matches_kserve() {
    check(serde_json::to_value(config_crd()).unwrap(), reference("serving.kserve.io_llminferenceserviceconfigs.yaml"));
}
