//! Kubernetes strategic merge of `LLMInferenceService` specs (as JSON): maps merge key by
//! key, later wins; in pod specs, lists with a merge key (containers by `name`, env by `name`,
//! volume mounts by `mountPath`…) merge element by element; every other list — `command`
//! and `args` included — is replaced whole. `null` deletes a key.

use serde_json::Value;

#[derive(Clone, Copy)]
enum Kind {
    /// Spec structure outside pod specs (lists are atomic).
    Plain,
    PodSpec,
    Container,
}

/// Which kind a child key has, and for lists the merge key and element kind.
fn child(kind: Kind, key: &str) -> (Kind, Option<(&'static str, Kind)>) {
    match (kind, key) {
        (Kind::Plain, "template" | "worker") => (Kind::PodSpec, None),
        (Kind::PodSpec, "containers" | "initContainers" | "ephemeralContainers") => {
            (Kind::Plain, Some(("name", Kind::Container)))
        }
        (Kind::PodSpec, "volumes" | "imagePullSecrets" | "resourceClaims") => {
            (Kind::Plain, Some(("name", Kind::Plain)))
        }
        (Kind::PodSpec, "hostAliases") => (Kind::Plain, Some(("ip", Kind::Plain))),
        (Kind::Container, "env") => (Kind::Plain, Some(("name", Kind::Plain))),
        (Kind::Container, "volumeMounts") => (Kind::Plain, Some(("mountPath", Kind::Plain))),
        (Kind::Container, "volumeDevices") => (Kind::Plain, Some(("devicePath", Kind::Plain))),
        (Kind::Container, "ports") => (Kind::Plain, Some(("containerPort", Kind::Plain))),
        // Inside pod specs and containers, nested structs (securityContext, resources…) merge
        // as maps with atomic lists.
        _ => (Kind::Plain, None),
    }
}

/// Merge `over` into `base` (an `LLMInferenceService` spec, or a config's spec).
pub fn merge_spec(base: &mut Value, over: &Value) {
    merge(base, over, Kind::Plain);
}

fn merge(base: &mut Value, over: &Value, kind: Kind) {
    let (Value::Object(b), Value::Object(o)) = (&mut *base, over) else {
        *base = over.clone();
        return;
    };
    for (key, ov) in o {
        if ov.is_null() {
            b.remove(key);
            continue;
        }
        let (child_kind, list) = child(kind, key);
        match (b.get_mut(key), list) {
            (Some(Value::Array(bl)), Some((merge_key, elem))) if ov.is_array() => {
                merge_list(bl, ov.as_array().map(Vec::as_slice).unwrap_or_default(), merge_key, elem)
            }
            (Some(bv), _) if bv.is_object() && ov.is_object() => merge(bv, ov, child_kind),
            _ => {
                b.insert(key.clone(), ov.clone());
            }
        }
    }
}

fn merge_list(base: &mut Vec<Value>, over: &[Value], key: &str, elem: Kind) {
    for item in over {
        let id = item.get(key);
        match base.iter_mut().find(|b| id.is_some() && b.get(key) == id) {
            Some(existing) => merge(existing, item, elem),
            None => base.push(item.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name_and_args_are_replaced() {
        let mut base = json!({"template": {"containers": [{
            "name": "main", "image": "preset", "command": ["tessera", "serve"], "args": ["--a", "--b"],
            "env": [{"name": "HOME", "value": "/home"}, {"name": "LEVEL", "value": "INFO"}],
            "volumeMounts": [{"name": "home", "mountPath": "/home"}],
        }], "volumes": [{"name": "home", "emptyDir": {}}]}});
        let over = json!({"template": {"containers": [
            {"name": "main", "image": "mine", "args": ["--c"], "env": [{"name": "LEVEL", "value": "DEBUG"}],
             "resources": {"limits": {"cpu": "1"}}},
            {"name": "sidecar", "image": "s"},
        ], "volumes": [{"name": "extra", "emptyDir": {}}]}});
        merge_spec(&mut base, &over);
        let c = &base["template"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[0]["image"], "mine");
        assert_eq!(c[0]["command"], json!(["tessera", "serve"]));
        assert_eq!(c[0]["args"], json!(["--c"]));
        assert_eq!(c[0]["env"], json!([{"name": "HOME", "value": "/home"}, {"name": "LEVEL", "value": "DEBUG"}]));
        assert_eq!(c[0]["volumeMounts"].as_array().unwrap().len(), 1);
        assert_eq!(c[0]["resources"]["limits"]["cpu"], "1");
        assert_eq!(c[1]["name"], "sidecar");
        assert_eq!(base["template"]["volumes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn plain_lists_are_atomic_and_maps_deep_merge() {
        let mut base = json!({"model": {"uri": "a", "lora": {"adapters": [{"name": "x"}]}}, "replicas": 1,
                              "template": {"tolerations": [{"key": "a"}], "securityContext": {"runAsUser": 1}}});
        let over = json!({"model": {"lora": {"adapters": [{"name": "y"}]}}, "replicas": 3,
                          "template": {"tolerations": [{"key": "b"}], "securityContext": {"fsGroup": 2}}});
        merge_spec(&mut base, &over);
        assert_eq!(base["model"], json!({"uri": "a", "lora": {"adapters": [{"name": "y"}]}}));
        assert_eq!(base["replicas"], 3);
        assert_eq!(base["template"]["tolerations"], json!([{"key": "b"}]));
        assert_eq!(base["template"]["securityContext"], json!({"runAsUser": 1, "fsGroup": 2}));
    }

    #[test]
    fn null_deletes() {
        let mut base = json!({"router": {"route": {}, "scheduler": {}}});
        merge_spec(&mut base, &json!({"router": {"scheduler": null}}));
        assert_eq!(base, json!({"router": {"route": {}}}));
    }
}
