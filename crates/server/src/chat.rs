//! Chat templates (Jinja, as shipped in `tokenizer_config.json` or GGUF metadata), rendered
//! with minijinja plus Python string-method compatibility.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::ApiError;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// One message as a template sees it (`tool_calls` on an assistant turn that made calls,
/// `tool_call_id` on a tool turn).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compile `source`; the error says what is wrong with the template.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("chat template does not compile: {e}"))?;
        Ok(Self { env, bos_token: bos_token.unwrap_or_default(), eos_token: eos_token.unwrap_or_default() })
    }

    /// Render `(role, content)` messages, with the generation prompt appended when asked.
    pub fn render(&self, messages: &[(String, String)], add_generation_prompt: bool) -> Result<String, ApiError> {
        let msgs: Vec<TemplateMessage> = messages
            .iter()
            .map(|(r, c)| TemplateMessage { role: r.clone(), content: c.clone(), ..Default::default() })
            .collect();
        self.render_with_tools(&msgs, None, add_generation_prompt)
    }

    /// Render messages and, when given, the request's `tools` (as sent: `[{type, function}]`).
    pub fn render_with_tools(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ApiError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ApiError::Internal(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| minijinja::Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ApiError::BadRequest {
            message: format!("the chat template rejected these messages: {e}"),
            param: Some("messages".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[("user".into(), " hi ".into())], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&[("user".into(), " hi ".into())], false).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn raise_exception_becomes_a_400() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let e = t.render(&[], true).unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }
}
