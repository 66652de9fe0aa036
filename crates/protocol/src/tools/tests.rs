//! `tools` / `tool_choice` validation, the enforcing constraints, and the four parsers.

use super::*;

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

fn calls(v: &[(&str, Value)]) -> Vec<FunctionCall> {
    v.iter().map(|(n, a)| FunctionCall { name: n.to_string(), arguments: a.to_string() }).collect()
}

#[test]
fn choices_are_validated_against_the_tools() {
    let tools = [weather()];
    assert_eq!(tool_request(None, None).unwrap(), None);
    let r = tool_request(Some(&tools), None).unwrap().unwrap();
    assert_eq!((r.choice, r.tools[0].name.as_str()), (ToolChoice::Auto, "get_weather"));
    for (choice, want) in [
        (json!("none"), ToolChoice::None),
        (json!("auto"), ToolChoice::Auto),
        (json!("required"), ToolChoice::Required),
        (json!({"type": "function", "function": {"name": "get_weather"}}), ToolChoice::Named("get_weather".into())),
    ] {
        assert_eq!(tool_request(Some(&tools), Some(&choice)).unwrap().unwrap().choice, want);
    }
    for (tools, choice, param) in [
        (vec![json!({"type": "function"})], None, "tools"),
        (vec![json!({"type": "retrieval", "function": {"name": "x"}})], None, "tools"),
        (vec![json!({"type": "function", "function": {"name": "x", "parameters": 3}})], None, "tools"),
        (vec![weather()], Some(json!("sometimes")), "tool_choice"),
        (vec![weather()], Some(json!({"type": "function", "function": {"name": "nope"}})), "tool_choice"),
        (vec![], Some(json!("required")), "tool_choice"),
    ] {
        let e = tool_request(Some(&tools), choice.as_ref()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{tools:?} {choice:?}: {e:?}");
    }
}

#[test]
fn forced_choices_become_constraints_and_their_output_calls() {
    let tools = [weather()];
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let r = tool_request(Some(&tools), Some(&named)).unwrap().unwrap();
    assert_eq!(r.constraint(), Some(Constraint::JsonSchema(tools[0]["function"]["parameters"].clone())));
    assert_eq!(r.forced_calls(r#"{"city": "Paris"}"#).unwrap(), calls(&[("get_weather", json!({"city": "Paris"}))]));
    let r = tool_request(Some(&tools), Some(&json!("required"))).unwrap().unwrap();
    let Some(Constraint::JsonSchema(s)) = r.constraint() else { panic!() };
    assert_eq!(s["minItems"], 1);
    assert_eq!(s["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");
    let out = r#"[{"name": "get_weather", "parameters": {"city": "Rome"}}]"#;
    assert_eq!(r.forced_calls(out).unwrap(), calls(&[("get_weather", json!({"city": "Rome"}))]));
    assert_eq!(tool_request(Some(&tools), Some(&json!("auto"))).unwrap().unwrap().constraint(), None);
}

#[test]
fn each_parser_reads_its_format_and_leaves_plain_text_alone() {
    let paris = json!({"city": "Paris"});
    let two = calls(&[("get_weather", paris.clone()), ("now", json!({}))]);
    for (parser, text, content, want) in [
        (
            ToolParser::Hermes,
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>",
            "Let me look.",
            two.clone(),
        ),
        (
            ToolParser::Llama3Json,
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"now\", \"parameters\": {}}",
            "",
            two.clone(),
        ),
        (
            ToolParser::Mistral,
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"now\", \"arguments\": {}}]",
            "",
            two.clone(),
        ),
        (ToolParser::Pythonic, "[get_weather(city='Paris'), now()]", "", two.clone()),
    ] {
        assert_eq!(parser.parse(text), (content.to_string(), want), "{parser:?}");
        let plain = "The weather in Paris is mild.";
        assert_eq!(parser.parse(plain), (plain.to_string(), vec![]), "{parser:?} on plain text");
    }
    let (_, c) = ToolParser::Pythonic.parse(r#"[f(a=1, b=[True, None], c={"k": "v\"q"}, d=-2.5)]"#);
    assert_eq!(c, calls(&[("f", json!({"a": 1, "b": [true, null], "c": {"k": "v\"q"}, "d": -2.5}))]));
    // A broken call is content, not a call.
    assert!(ToolParser::Hermes.parse("<tool_call>{\"name\": oops}</tool_call>").1.is_empty());
    assert_eq!("mistral".parse::<ToolParser>(), Ok(ToolParser::Mistral));
    assert!("xml".parse::<ToolParser>().is_err());
}
