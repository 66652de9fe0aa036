//! Go-template variables in preset and config strings (`{{ .Spec.Model.Name }}`,
//! `{{ ChildName .ObjectMeta.Name "-suffix" }}`, `{{ or .Spec.Parallelism.Data 1 }}`), rendered
//! the way KServe renders them: over the submitted service, with Go's field names.

use std::collections::HashMap;

use gtmpl::{Context, FuncError, Template, Value as Tv};
use serde_json::Value;

use crate::names::child_name;
use crate::Error;

/// Operator-wide values templates may read as `.GlobalConfig.*`.
#[derive(Clone, Debug)]
pub struct GlobalConfig {
    pub ingress_gateway_name: String,
    pub ingress_gateway_namespace: String,
}

impl Default for GlobalConfig {
    fn default() -> Self {
        Self { ingress_gateway_name: "kserve-ingress-gateway".into(), ingress_gateway_namespace: "kserve".into() }
    }
}

/// Go struct fields that exist even when unset (a nil pointer in Go, `Nil` here), so
/// `{{ or .Spec.Parallelism.DataLocal 1 }}` works and a misspelt field is an error.
fn struct_fields(path: &str) -> &'static [&'static str] {
    match path {
        "" => &["ObjectMeta", "Spec", "GlobalConfig"],
        "ObjectMeta" => &["Name", "Namespace", "Labels", "Annotations", "Generation"],
        "Spec" => &["Model", "Replicas", "Parallelism", "Template", "Worker", "Prefill", "Router", "BaseRefs"],
        "Spec.Model" => &["URI", "Name", "Criticality", "LoRA"],
        "Spec.Parallelism" | "Spec.Prefill.Parallelism" => {
            &["Tensor", "Pipeline", "Data", "DataLocal", "DataRPCPort", "Expert"]
        }
        "Spec.Prefill" => &["Replicas", "Parallelism", "Template", "Worker"],
        "Spec.Router" => &["Route", "Gateway", "Ingress", "Scheduler"],
        _ => &[],
    }
}

/// JSON key → Go field name.
fn go_name(key: &str) -> String {
    match key {
        "uri" => "URI".into(),
        "lora" => "LoRA".into(),
        "metadata" => "ObjectMeta".into(),
        _ => {
            let mut c = key.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
        }
    }
}

fn to_template_value(v: &Value, path: &str) -> Tv {
    match v {
        Value::Null => Tv::Nil,
        Value::Bool(b) => Tv::Bool(*b),
        Value::Number(n) => n.as_i64().map(Tv::from).or_else(|| n.as_f64().map(Tv::from)).unwrap_or(Tv::Nil),
        Value::String(s) => Tv::String(s.clone()),
        Value::Array(a) => Tv::Array(a.iter().map(|x| to_template_value(x, "")).collect()),
        Value::Object(o) => {
            let fields = struct_fields(path);
            // Labels, annotations and other maps keep their keys; structs get Go names.
            let is_struct = !matches!(path, "ObjectMeta.Labels" | "ObjectMeta.Annotations");
            let mut out: HashMap<String, Tv> = fields.iter().map(|f| (f.to_string(), Tv::Nil)).collect();
            for (k, x) in o {
                let name = if is_struct { go_name(k) } else { k.clone() };
                let child = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                out.insert(name, to_template_value(x, &child));
            }
            if fields.is_empty() && !is_struct {
                Tv::Map(out)
            } else {
                Tv::Object(out)
            }
        }
    }
}

/// `ChildName parent suffix` (knative's kmeta.ChildName).
fn child_name_func(args: &[Tv]) -> Result<Tv, FuncError> {
    match args {
        [Tv::String(parent), Tv::String(suffix)] => Ok(Tv::String(child_name(parent, suffix))),
        _ => Err(FuncError::Generic("ChildName takes two strings (parent, suffix)".into())),
    }
}

/// The data templates see: the service (metadata and spec, JSON as the API server stores it)
/// and the global config.
pub struct Renderer {
    ctx: Context,
}

impl Renderer {
    /// `metadata` and `spec` are the service's, as JSON.
    pub fn new(metadata: &Value, spec: &Value, global: &GlobalConfig) -> Self {
        let root = serde_json::json!({
            "metadata": metadata,
            "spec": spec,
            "globalConfig": {
                "ingressGatewayName": global.ingress_gateway_name,
                "ingressGatewayNamespace": global.ingress_gateway_namespace,
            },
        });
        Self { ctx: Context::from(to_template_value(&root, "")) }
    }

    /// Render one template string.
    pub fn render_str(&self, text: &str) -> Result<String, Error> {
        let mut t = Template::default();
        t.add_func("ChildName", child_name_func);
        let bad = |e: String| Error::Template { template: text.to_string(), message: e };
        t.parse(text).map_err(|e| bad(e.to_string()))?;
        let out = t.render(&self.ctx).map_err(|e| bad(e.to_string()))?;
        if out.contains("<no value>") {
            return Err(bad("a variable has no value".into()));
        }
        Ok(out)
    }

    /// Render every string in `v` that contains a template action, in place.
    pub fn render_json(&self, v: &mut Value) -> Result<(), Error> {
        match v {
            Value::String(s) if s.contains("{{") => {
                *s = self.render_str(s)?;
                Ok(())
            }
            Value::Array(a) => a.iter_mut().try_for_each(|x| self.render_json(x)),
            Value::Object(o) => o.values_mut().try_for_each(|x| self.render_json(x)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn renderer(spec: Value) -> Renderer {
        Renderer::new(&json!({"name": "svc", "namespace": "ns"}), &spec, &GlobalConfig::default())
    }

    #[test]
    fn renders_kserve_variables() {
        let r = renderer(json!({"model": {"name": "org/m", "uri": "hf://org/m"}, "parallelism": {"tensor": 4}}));
        assert_eq!(r.render_str("{{ .Spec.Model.Name }}").unwrap(), "org/m");
        assert_eq!(r.render_str("{{ .Spec.Model.URI }}").unwrap(), "hf://org/m");
        assert_eq!(r.render_str("/{{ .ObjectMeta.Namespace }}/{{ .ObjectMeta.Name }}").unwrap(), "/ns/svc");
        assert_eq!(r.render_str("{{ ChildName .ObjectMeta.Name `-inference-pool` }}").unwrap(), "svc-inference-pool");
        assert_eq!(r.render_str("{{ or .Spec.Parallelism.DataLocal 1 }}").unwrap(), "1");
        assert_eq!(
            r.render_str("a {{- if .Spec.Parallelism.Tensor }} --tp {{ .Spec.Parallelism.Tensor }}{{- end }} b")
                .unwrap(),
            "a --tp 4 b"
        );
        assert_eq!(r.render_str("{{ if .Spec.Parallelism.DataRPCPort }}x{{ else }}5555{{- end }}").unwrap(), "5555");
        assert_eq!(r.render_str("{{ .GlobalConfig.IngressGatewayName }}").unwrap(), "kserve-ingress-gateway");
    }

    #[test]
    fn misspelt_or_missing_variables_are_errors() {
        let r = renderer(json!({"model": {"uri": "hf://x"}}));
        let e = r.render_str("{{ .Spec.Modle.Name }}").unwrap_err().to_string();
        assert!(e.contains("{{ .Spec.Modle.Name }}"), "{e}");
        // Parallelism is nil: reading through it fails, as in Go.
        assert!(r.render_str("{{ .Spec.Parallelism.Tensor }}").is_err());
        assert!(r.render_str("{{ .Spec.Model.Name").is_err());
    }

    #[test]
    fn renders_json_in_place() {
        let r = renderer(json!({"model": {"name": "m", "uri": "hf://m"}}));
        let mut v = json!({"args": ["--served-model-name", "{{ .Spec.Model.Name }}"], "n": 3});
        r.render_json(&mut v).unwrap();
        assert_eq!(v, json!({"args": ["--served-model-name", "m"], "n": 3}));
    }
}
