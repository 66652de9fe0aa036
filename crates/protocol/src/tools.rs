//! Tool calling on chat completions, as vLLM serves it: `tools` and `tool_choice` validated
//! into a [`ToolRequest`]; `required` and a named function enforced by a structured output
//! (so the arguments always parse as JSON matching the parameters' schema); `auto` left to
//! the model and read back by a [`ToolParser`] (vLLM's `--tool-call-parser` names).

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::{Constraint, ProtocolError};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// JSON schema of the arguments (`{"type": "object"}` when the request gives none).
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A chat request's tools and choice.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
}

fn bad(param: &str, msg: impl Into<String>) -> ProtocolError {
    ProtocolError::param(param, msg)
}

fn tool(i: usize, v: &Value) -> Result<Tool, ProtocolError> {
    let at = |what: &str| bad("tools", format!("`tools[{i}]`: {what}"));
    if v.get("type").and_then(Value::as_str) != Some("function") {
        return Err(at("`type` must be \"function\""));
    }
    let f = v.get("function").and_then(Value::as_object).ok_or_else(|| at("`function` must be an object"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| at("`function.name` is required"))?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err(at("`function.parameters` must be a JSON schema object")),
    };
    Ok(Tool { name: name.to_string(), parameters })
}

/// Validate `tools` and `tool_choice` (absent `tool_choice` means `auto` when tools are
/// given, as OpenAI's). `None` when the request has no tools and no choice.
pub fn tool_request(tools: Option<&[Value]>, choice: Option<&Value>) -> Result<Option<ToolRequest>, ProtocolError> {
    let tools: Vec<Tool> =
        tools.unwrap_or_default().iter().enumerate().map(|(i, t)| tool(i, t)).collect::<Result<_, _>>()?;
    let choice = match choice {
        None | Some(Value::Null) if tools.is_empty() => return Ok(None),
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or a function, got `{other}`"),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad("tool_choice", "`tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
                })?;
            ToolChoice::Named(name.to_string())
        }
    };
    if tools.is_empty() && choice != ToolChoice::None {
        return Err(bad("tool_choice", "`tool_choice` needs `tools`"));
    }
    if let ToolChoice::Named(n) = &choice {
        if !tools.iter().any(|t| &t.name == n) {
            return Err(bad("tool_choice", format!("`tool_choice` names `{n}`, which is not in `tools`")));
        }
    }
    Ok(Some(ToolRequest { tools, choice }))
}

impl ToolRequest {
    /// The structured output that enforces the choice: a named function's arguments, or for
    /// `required` a non-empty list of `{"name", "parameters"}` calls (vLLM's forms).
    pub fn constraint(&self) -> Option<Constraint> {
        match &self.choice {
            ToolChoice::Named(n) => {
                self.tools.iter().find(|t| &t.name == n).map(|t| Constraint::JsonSchema(t.parameters.clone()))
            }
            ToolChoice::Required => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|t| {
                        json!({"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                               "required": ["name", "parameters"], "additionalProperties": false})
                    })
                    .collect();
                Some(Constraint::JsonSchema(json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}})))
            }
            ToolChoice::None | ToolChoice::Auto => None,
        }
    }

    /// The calls in a constrained output (`required` / named), if it parses.
    pub fn forced_calls(&self, output: &str) -> Option<Vec<FunctionCall>> {
        match &self.choice {
            ToolChoice::Named(n) => {
                let args: Value = serde_json::from_str(output.trim()).ok()?;
                Some(vec![FunctionCall { name: n.clone(), arguments: args.to_string() }])
            }
            ToolChoice::Required => {
                let list: Vec<Value> = serde_json::from_str(output.trim()).ok()?;
                list.iter().map(|c| call(c, "parameters")).collect()
            }
            _ => None,
        }
    }
}

/// A function call as the response carries it (`arguments` is JSON text).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// `{"name": .., key: {..}}` (or `arguments`) as a call.
fn call(v: &Value, key: &str) -> Option<FunctionCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get(key).or_else(|| v.get("arguments")).or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(FunctionCall { name, arguments })
}

/// vLLM's `--tool-call-parser` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    /// `<tool_call>{"name": .., "arguments": {..}}</tool_call>` (Hermes, Qwen).
    Hermes,
    /// `{"name": .., "parameters": {..}}` (Llama 3.x JSON calls, after `<|python_tag|>` if any; `;`-separated).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": .., "arguments": {..}}]`.
    Mistral,
    /// `[get_weather(city="Paris"), now()]`.
    Pythonic,
}

impl std::str::FromStr for ToolParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "hermes" => Self::Hermes,
            "llama3_json" => Self::Llama3Json,
            "mistral" => Self::Mistral,
            "pythonic" => Self::Pythonic,
            other => {
                return Err(format!("unknown tool-call parser `{other}` (hermes, llama3_json, mistral, pythonic)"))
            }
        })
    }
}

impl ToolParser {
    /// Split a model's text into (content, calls). Text without a well-formed call is all content.
    pub fn parse(self, text: &str) -> (String, Vec<FunctionCall>) {
        let none = || (text.to_string(), vec![]);
        match self {
            Self::Hermes => {
                let Some(start) = text.find("<tool_call>") else { return none() };
                let mut calls = Vec::new();
                for part in text[start..].split("<tool_call>").skip(1) {
                    let body = part.split("</tool_call>").next().unwrap_or("").trim();
                    match serde_json::from_str::<Value>(body).ok().and_then(|v| call(&v, "arguments")) {
                        Some(c) => calls.push(c),
                        None => return none(),
                    }
                }
                (text[..start].trim().to_string(), calls)
            }
            Self::Llama3Json => {
                let t = text.trim();
                let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
                if !t.starts_with('{') {
                    return none();
                }
                let calls: Option<Vec<FunctionCall>> = t
                    .split(';')
                    .map(|p| serde_json::from_str::<Value>(p.trim()).ok().and_then(|v| call(&v, "parameters")))
                    .collect();
                calls.map(|c| (String::new(), c)).unwrap_or_else(none)
            }
            Self::Mistral => {
                let Some(start) = text.find("[TOOL_CALLS]") else { return none() };
                let body = text[start + "[TOOL_CALLS]".len()..].trim();
                let calls: Option<Vec<FunctionCall>> = serde_json::from_str::<Vec<Value>>(body)
                    .ok()
                    .and_then(|l| l.iter().map(|v| call(v, "arguments")).collect());
                calls.map(|c| (text[..start].trim().to_string(), c)).unwrap_or_else(none)
            }
            Self::Pythonic => pythonic::calls(text.trim()).map(|c| (String::new(), c)).unwrap_or_else(none),
        }
    }
}

/// A reader for `[f(a=1, b="x"), g()]`: Python literals (strings, numbers, True/False/None,
/// lists, dicts) as keyword arguments.
mod pythonic {
    use super::*;

    struct P<'a> {
        s: &'a [u8],
        at: usize,
    }

    impl P<'_> {
        fn ws(&mut self) {
            while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
                self.at += 1;
            }
        }
        fn eat(&mut self, c: u8) -> Option<()> {
            self.ws();
            (self.s.get(self.at) == Some(&c)).then(|| self.at += 1)
        }
        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.at).copied()
        }
        fn ident(&mut self) -> Option<String> {
            self.ws();
            let start = self.at;
            while self.at < self.s.len()
                && (self.s[self.at].is_ascii_alphanumeric() || b"_.".contains(&self.s[self.at]))
            {
                self.at += 1;
            }
            (self.at > start).then(|| String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
        }
        fn string(&mut self) -> Option<Value> {
            let q = self.s[self.at];
            self.at += 1;
            let mut out = Vec::new();
            while let Some(&c) = self.s.get(self.at) {
                self.at += 1;
                match c {
                    b'\\' => {
                        let e = *self.s.get(self.at)?;
                        self.at += 1;
                        out.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            other => other,
                        });
                    }
                    c if c == q => return Some(Value::String(String::from_utf8(out).ok()?)),
                    c => out.push(c),
                }
            }
            None
        }
        fn value(&mut self) -> Option<Value> {
            match self.peek()? {
                b'"' | b'\'' => self.string(),
                b'[' => {
                    self.at += 1;
                    let mut items = Vec::new();
                    while self.peek()? != b']' {
                        items.push(self.value()?);
                        if self.eat(b',').is_none() {
                            break;
                        }
                    }
                    self.eat(b']')?;
                    Some(Value::Array(items))
                }
                b'{' => {
                    self.at += 1;
                    let mut m = Map::new();
                    while self.peek()? != b'}' {
                        let Value::String(k) = self.value()? else { return None };
                        self.eat(b':')?;
                        m.insert(k, self.value()?);
                        if self.eat(b',').is_none() {
                            break;
                        }
                    }
                    self.eat(b'}')?;
                    Some(Value::Object(m))
                }
                _ => {
                    let start = self.at;
                    while self.at < self.s.len() && !b",)]} \n\t".contains(&self.s[self.at]) {
                        self.at += 1;
                    }
                    let word = std::str::from_utf8(&self.s[start..self.at]).ok()?;
                    match word {
                        "True" => Some(Value::Bool(true)),
                        "False" => Some(Value::Bool(false)),
                        "None" => Some(Value::Null),
                        w => serde_json::from_str::<serde_json::Number>(w).ok().map(Value::Number),
                    }
                }
            }
        }
        fn call(&mut self) -> Option<FunctionCall> {
            let name = self.ident()?;
            self.eat(b'(')?;
            let mut args = Map::new();
            while self.peek()? != b')' {
                let k = self.ident()?;
                self.eat(b'=')?;
                args.insert(k, self.value()?);
                if self.eat(b',').is_none() {
                    break;
                }
            }
            self.eat(b')')?;
            Some(FunctionCall { name, arguments: Value::Object(args).to_string() })
        }
    }

    pub(super) fn calls(text: &str) -> Option<Vec<FunctionCall>> {
        let mut p = P { s: text.as_bytes(), at: 0 };
        p.eat(b'[')?;
        let mut out = Vec::new();
        while p.peek()? != b']' {
            out.push(p.call()?);
            if p.eat(b',').is_none() {
                break;
            }
        }
        p.eat(b']')?;
        p.ws();
        (p.at == p.s.len() && !out.is_empty()).then_some(out)
    }
}

#[cfg(test)]
mod tests;
