//! Structured-output requests, normalised: OpenAI's `response_format` (`json_object`,
//! `json_schema`), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
//! and its newer `structured_outputs` object all become one [`Constraint`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::requests::CommonParams;
use crate::ProtocolError;

/// What a sequence's output must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Constraint {
    /// JSON valid under this JSON schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Grammar(String),
}

/// A request's constraint and the parameter that asked for it (named by errors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StructuredOutput {
    pub param: String,
    pub constraint: Constraint,
}

fn bad(param: &str, msg: impl Into<String>) -> ProtocolError {
    ProtocolError::param(param, msg)
}

/// A schema given as an object, or as JSON text (vLLM accepts both).
fn schema(param: &str, v: &Value) -> Result<Value, ProtocolError> {
    match v {
        Value::String(s) => {
            serde_json::from_str(s).map_err(|e| bad(param, format!("`{param}` is not a JSON schema: {e}")))
        }
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(bad(param, format!("`{param}` must be a JSON schema (an object)"))),
    }
}

fn text(param: &str, v: &Value) -> Result<String, ProtocolError> {
    v.as_str().map(str::to_string).ok_or_else(|| bad(param, format!("`{param}` must be a string")))
}

fn choices(param: &str, v: &Value) -> Result<Vec<String>, ProtocolError> {
    let list = v.as_array().ok_or_else(|| bad(param, format!("`{param}` must be a list of strings")))?;
    let out: Option<Vec<String>> = list.iter().map(|c| c.as_str().map(str::to_string)).collect();
    match out {
        Some(o) if !o.is_empty() => Ok(o),
        Some(_) => Err(bad(param, format!("`{param}` must not be empty"))),
        None => Err(bad(param, format!("`{param}` must be a list of strings"))),
    }
}

/// `additionalProperties: false` on every object schema inside `v` that does not say
/// otherwise: OpenAI's strict mode, and vLLM's `disable_additional_properties`. (Without it a
/// small model can go on adding keys until its token budget runs out.)
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let is_object = o
                .get("type")
                .is_some_and(|t| t == "object" || t.as_array().is_some_and(|a| a.contains(&Value::from("object"))))
                || o.contains_key("properties");
            if is_object {
                o.entry("additionalProperties").or_insert(Value::Bool(false));
            }
            o.values_mut().for_each(close_objects);
        }
        Value::Array(a) => a.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// OpenAI's `response_format`.
fn response_format(v: &Value) -> Result<Option<Constraint>, ProtocolError> {
    let p = "response_format";
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| bad(p, "`response_format.type` is required"))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        "json_schema" => {
            let js = v.get("json_schema").ok_or_else(|| bad(p, "`response_format.json_schema` is required"))?;
            let s = js.get("schema").ok_or_else(|| bad(p, "`response_format.json_schema.schema` is required"))?;
            let mut s = schema(p, s)?;
            if js.get("strict").and_then(Value::as_bool) == Some(true) {
                close_objects(&mut s);
            }
            Ok(Some(Constraint::JsonSchema(s)))
        }
        other => Err(bad(p, format!("`response_format.type` must be text, json_object or json_schema, got `{other}`"))),
    }
}

/// vLLM's `structured_outputs: {json | regex | choice | grammar | json_object}`.
fn structured_outputs(v: &Value) -> Result<Option<Constraint>, ProtocolError> {
    let p = "structured_outputs";
    let o = v.as_object().ok_or_else(|| bad(p, "`structured_outputs` must be an object"))?;
    let mut found = Vec::new();
    let closed = o.get("disable_additional_properties").and_then(Value::as_bool) == Some(true);
    for (k, val) in o {
        if val.is_null() || val == &Value::Bool(false) {
            continue;
        }
        let c = match k.as_str() {
            "json" => {
                let mut s = schema(p, val)?;
                if closed {
                    close_objects(&mut s);
                }
                Constraint::JsonSchema(s)
            }
            "regex" => Constraint::Regex(text(p, val)?),
            "choice" => Constraint::Choice(choices(p, val)?),
            "grammar" => Constraint::Grammar(text(p, val)?),
            "json_object" => Constraint::JsonObject,
            // Options: JSON is always generated without free whitespace here, and no other
            // back-end to fall back to; `disable_additional_properties` is applied above.
            "disable_any_whitespace" | "disable_fallback" | "disable_additional_properties" | "whitespace_pattern" => {
                continue
            }
            other => return Err(bad(p, format!("`structured_outputs.{other}` is not supported"))),
        };
        found.push(c);
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(bad(p, "`structured_outputs` may set only one of json, regex, choice, grammar, json_object")),
    }
}

/// The request's constraint, if any; more than one is a 400 naming them.
pub fn constraint(c: &CommonParams) -> Result<Option<StructuredOutput>, ProtocolError> {
    let mut found: Vec<(&str, Constraint)> = Vec::new();
    if let Some(v) = c.response_format.as_ref().filter(|v| !v.is_null()) {
        if let Some(k) = response_format(v)? {
            found.push(("response_format", k));
        }
    }
    let set = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
    if let Some(v) = set(&c.guided_json) {
        found.push(("guided_json", Constraint::JsonSchema(schema("guided_json", &v)?)));
    }
    if let Some(v) = set(&c.guided_regex) {
        found.push(("guided_regex", Constraint::Regex(text("guided_regex", &v)?)));
    }
    if let Some(v) = set(&c.guided_choice) {
        found.push(("guided_choice", Constraint::Choice(choices("guided_choice", &v)?)));
    }
    if let Some(v) = set(&c.guided_grammar) {
        found.push(("guided_grammar", Constraint::Grammar(text("guided_grammar", &v)?)));
    }
    if let Some(v) = set(&c.structured_outputs) {
        if let Some(k) = structured_outputs(&v)? {
            found.push(("structured_outputs", k));
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
        return Err(bad(names[1], format!("only one structured output may be asked for, got {}", names.join(", "))));
    }
    Ok(found.pop().map(|(param, constraint)| StructuredOutput { param: param.to_string(), constraint }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Option<Constraint>, ProtocolError> {
        let c: CommonParams = serde_json::from_str(body).expect("common params");
        constraint(&c).map(|s| s.map(|s| s.constraint))
    }

    #[test]
    fn every_spelling_becomes_one_constraint() {
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        // `strict` closes the objects (OpenAI's strict mode).
        let closed = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false});
        let cases = [
            (r#"{"response_format":{"type":"text"}}"#.to_string(), None),
            (r#"{"response_format":{"type":"json_object"}}"#.to_string(), Some(Constraint::JsonObject)),
            (
                format!(
                    r#"{{"response_format":{{"type":"json_schema","json_schema":{{"name":"x","strict":true,"schema":{schema}}}}}}}"#
                ),
                Some(Constraint::JsonSchema(closed.clone())),
            ),
            (format!(r#"{{"guided_json":{schema}}}"#), Some(Constraint::JsonSchema(schema.clone()))),
            (
                format!(r#"{{"guided_json":{}}}"#, serde_json::to_string(&schema.to_string()).unwrap()),
                Some(Constraint::JsonSchema(schema.clone())),
            ),
            (r#"{"guided_regex":"[a-z]+"}"#.to_string(), Some(Constraint::Regex("[a-z]+".into()))),
            (
                r#"{"guided_choice":["yes","no"]}"#.to_string(),
                Some(Constraint::Choice(vec!["yes".into(), "no".into()])),
            ),
            (r#"{"guided_grammar":"start: \"a\""}"#.to_string(), Some(Constraint::Grammar("start: \"a\"".into()))),
            (r#"{"structured_outputs":{"regex":"\\d+"}}"#.to_string(), Some(Constraint::Regex("\\d+".into()))),
            (
                r#"{"structured_outputs":{"choice":["a"],"disable_any_whitespace":true}}"#.to_string(),
                Some(Constraint::Choice(vec!["a".into()])),
            ),
            (format!(r#"{{"structured_outputs":{{"json":{schema}}}}}"#), Some(Constraint::JsonSchema(schema.clone()))),
        ];
        for (body, want) in cases {
            assert_eq!(parse(&body).unwrap(), want, "{body}");
        }
    }

    #[test]
    fn strict_schemas_close_their_objects() {
        let schema = serde_json::json!({"type": "object", "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "c": {"type": "object", "additionalProperties": true}}});
        let body = serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}});
        let Some(Constraint::JsonSchema(s)) = parse(&body.to_string()).unwrap() else { panic!() };
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["properties"]["c"]["additionalProperties"], true, "what the schema says stays");
        let loose = serde_json::json!({"structured_outputs": {"json": schema}});
        let Some(Constraint::JsonSchema(s)) = parse(&loose.to_string()).unwrap() else { panic!() };
        assert!(s.get("additionalProperties").is_none(), "not strict: as given");
        let closed = serde_json::json!({"structured_outputs": {"json": schema, "disable_additional_properties": true}});
        let Some(Constraint::JsonSchema(s)) = parse(&closed.to_string()).unwrap() else { panic!() };
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
    }

    #[test]
    fn the_asking_parameter_is_kept() {
        let c: CommonParams = serde_json::from_str(r#"{"guided_regex":"a"}"#).unwrap();
        assert_eq!(constraint(&c).unwrap().unwrap().param, "guided_regex");
    }

    #[test]
    fn bad_or_conflicting_requests_name_the_parameter() {
        for (body, param) in [
            (r#"{"response_format":{"type":"xml"}}"#, "response_format"),
            (r#"{"response_format":{"type":"json_schema","json_schema":{"name":"x"}}}"#, "response_format"),
            (r#"{"guided_json":"{not json"}"#, "guided_json"),
            (r#"{"guided_json":3}"#, "guided_json"),
            (r#"{"guided_choice":[]}"#, "guided_choice"),
            (r#"{"guided_choice":["a",1]}"#, "guided_choice"),
            (r#"{"guided_regex":5}"#, "guided_regex"),
            (r#"{"guided_regex":"a","guided_choice":["b"]}"#, "guided_choice"),
            (r#"{"structured_outputs":{"regex":"a","choice":["b"]}}"#, "structured_outputs"),
            (r#"{"structured_outputs":{"xml":"a"}}"#, "structured_outputs"),
        ] {
            let e = parse(body).expect_err(body);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }
}
