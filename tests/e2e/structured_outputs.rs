//! Structured outputs on the real SmolLM2 worker: 32 JSON schemas over chat and completions
//! (every answer parses and validates with an independent JSON-schema validator), regex and
//! choice constraints, every spelling (`response_format`, `guided_*`, `structured_outputs`),
//! streaming and `n > 1`, a mixed batch equal to each request alone, and 400s that name what
//! cannot compile.

use futures::future::join_all;
use serde_json::{json, Value};
use tessera_tests::{client, sse_events, start_smollm2 as start};

/// The schemas: nested objects, arrays with min/max items, enums, `anyOf`, patterns,
/// required and optional properties, numbers with bounds.
fn schemas() -> Vec<Value> {
    let s = |max: u64| json!({"type": "string", "maxLength": max});
    vec![
        json!({"type": "object", "properties": {"name": s(20)}, "required": ["name"]}),
        json!({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]}),
        json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
        json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
        json!({"type": "object", "properties": {"city": s(24), "country": s(24)}, "required": ["city", "country"]}),
        json!({"type": "object", "properties": {"tags": {"type": "array", "items": s(10), "minItems": 1, "maxItems": 3}}, "required": ["tags"]}),
        json!({"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 2, "maxItems": 4}}, "required": ["scores"]}),
        json!({"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": s(16)}, "required": ["id", "name"]}}, "required": ["user"]}),
        json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]}),
        json!({"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "string", "maxLength": 8}]}}, "required": ["value"]}),
        json!({"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}}, "required": ["price"]}),
        json!({"type": "object", "properties": {"title": s(30), "year": {"type": "integer", "minimum": 1900, "maximum": 2030}}, "required": ["title", "year"]}),
        json!({"type": "object", "properties": {"a": {"type": "integer", "maximum": 9, "minimum": 0}, "b": {"type": "integer", "maximum": 9, "minimum": 0}}, "required": ["a"]}),
        json!({"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "why": s(40)}, "required": ["answer", "why"]}),
        json!({"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}, "y": {"type": "integer", "minimum": -50, "maximum": 50}}, "required": ["x", "y"], "additionalProperties": false}}, "required": ["point"]}),
        json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"n": s(8), "q": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n", "q"]}, "minItems": 1, "maxItems": 2}}, "required": ["items"]}),
        json!({"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]}),
        json!({"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]}),
        json!({"type": "object", "properties": {"first": s(12), "middle": s(12), "last": s(12)}, "required": ["first", "last"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3, "maxItems": 3}),
        json!({"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4}),
        json!({"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}, "required": ["matrix"]}),
        json!({"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "minimum": 0, "maximum": 50}}, "required": ["status", "count"]}),
        json!({"type": "object", "properties": {"temp": {"type": "number", "minimum": -40, "maximum": 60}, "unit": {"enum": ["C", "F"]}}, "required": ["temp", "unit"]}),
        json!({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{4}$"}, "active": {"type": "boolean"}}, "required": ["id", "active"]}),
        json!({"type": "object", "properties": {"kind": {"anyOf": [{"const": "cat"}, {"const": "dog"}]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}}, "required": ["kind", "legs"]}),
        json!({"type": "object", "properties": {"meta": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 1, "maximum": 3}, "tags": {"type": "array", "items": s(6), "maxItems": 2}}, "required": ["v"]}}, "required": ["meta"]}),
        json!({"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 20}}, "required": ["note"]}),
        json!({"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}, "label": s(10)}, "required": ["ratio"]}),
        json!({"type": "object", "properties": {"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "minItems": 1, "maxItems": 5}}, "required": ["days"]}),
        json!({"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"book": {"type": "object", "properties": {"author": s(20), "pages": {"type": "integer", "minimum": 1, "maximum": 2000}, "genres": {"type": "array", "items": s(12), "minItems": 1, "maxItems": 2}}, "required": ["author", "pages", "genres"]}}, "required": ["book"]}),
    ]
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.expect("response");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

fn check(schema: &Value, text: &str, what: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"));
    let validator = jsonschema::validator_for(schema).expect("the test's schema is valid");
    let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what}: {text} does not validate against {schema}: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_parses_and_validates_against_its_schema() {
    let (_running, base) = start(&["--max-num-seqs", "64"]).await;
    let c = client();
    let schemas = schemas();
    assert!(schemas.len() >= 30);
    // All at once: 32 schemas over chat and over completions, batched by the engine.
    let requests = schemas.iter().enumerate().flat_map(|(i, schema)| {
        let rf =
            json!({"type": "json_schema", "json_schema": {"name": format!("s{i}"), "strict": true, "schema": schema}});
        let chat = json!({
            "model": "smollm2", "temperature": 0, "max_tokens": 256, "response_format": rf,
            "messages": [{"role": "user", "content": format!("Reply in JSON matching this schema: {schema}")}],
        });
        // vLLM's spelling, with its switch for what OpenAI's strict mode implies.
        let completion = json!({
            "model": "smollm2", "temperature": 0, "max_tokens": 256,
            "structured_outputs": {"json": schema, "disable_additional_properties": true},
            "prompt": format!("A JSON document matching {schema}:\n"),
        });
        [(schema.clone(), "/v1/chat/completions", chat), (schema.clone(), "/v1/completions", completion)]
    });
    let futures = requests.map(|(schema, path, body)| {
        let (c, url) = (c.clone(), format!("{base}{path}"));
        async move { (schema, path, post(&c, url, body).await) }
    });
    for (schema, path, (status, v)) in join_all(futures).await {
        assert_eq!(status, 200, "{path} {schema}: {v}");
        let choice = &v["choices"][0];
        let text = choice["message"]["content"].as_str().or(choice["text"].as_str()).expect("text");
        assert_eq!(choice["finish_reason"], "stop", "{path} {schema}: ended by length: {text}");
        check(&schema, text, path);
        println!("{path}: {} tokens: {text}", v["usage"]["completion_tokens"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_choice_spellings_streaming_and_n_hold() {
    let (_running, base) = start(&[]).await;
    let c = client();
    let url = |p: &str| format!("{base}{p}");
    let phone = regex_check("^[0-9]{3}-[0-9]{4}$");
    for body in
        [json!({"guided_regex": "[0-9]{3}-[0-9]{4}"}), json!({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})]
    {
        let mut b = json!({"model": "smollm2", "prompt": "Call me at", "max_tokens": 20, "temperature": 0.8, "seed": 3, "n": 3});
        b.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let (status, v) = post(&c, url("/v1/completions"), b).await;
        assert_eq!(status, 200, "{v}");
        for ch in v["choices"].as_array().unwrap() {
            assert!(phone(ch["text"].as_str().unwrap()), "{ch}");
        }
    }
    let options = ["Paris", "London", "Rome"];
    for body in [json!({"guided_choice": options}), json!({"structured_outputs": {"choice": options}})] {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 10, "temperature": 0});
        b.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let (status, v) = post(&c, url("/v1/chat/completions"), b).await;
        assert_eq!(status, 200, "{v}");
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(options.contains(&answer), "{v}");
    }
    // json_object, streamed: the deltas join into one JSON object.
    let b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Describe a cat as JSON."}], "max_tokens": 120,
                   "temperature": 0, "stream": true, "response_format": {"type": "json_object"}});
    let events = sse_events(c.post(url("/v1/chat/completions")).json(&b).send().await.unwrap()).await;
    let mut text = String::new();
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()), "{text:?}");
    // A Lark grammar.
    let b = json!({"model": "smollm2", "prompt": "Count:", "max_tokens": 10, "temperature": 0,
                   "guided_grammar": "start: \" \" num \", \" num \", \" num\nnum: /[1-5]/"});
    let (status, v) = post(&c, url("/v1/completions"), b).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(regex_check("^ [1-5](, [1-5])*$")(text) && text.len() == 8, "{v}");
}

/// A tiny matcher for the anchored patterns above (digits, classes, literals, `{n}`, `(..)*`),
/// written here so the check does not trust the grammar engine it checks.
fn regex_check(pattern: &'static str) -> impl Fn(&str) -> bool {
    move |s: &str| match pattern {
        "^[0-9]{3}-[0-9]{4}$" => {
            let b = s.as_bytes();
            b.len() == 8 && b[3] == b'-' && b.iter().enumerate().all(|(i, c)| i == 3 || c.is_ascii_digit())
        }
        "^ [1-5](, [1-5])*$" => {
            let Some(rest) = s.strip_prefix(' ') else { return false };
            rest.split(", ").all(|p| p.len() == 1 && ("1"..="5").contains(&p))
        }
        _ => unreachable!("{pattern}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_equals_each_request_alone_and_bad_grammars_are_400s() {
    let (_running, base) = start(&[]).await;
    let c = client();
    let url = format!("{base}/v1/completions");
    let schema =
        json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]});
    let bodies = [
        json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}),
        json!({"model": "smollm2", "prompt": "Where is Paris? JSON:", "max_tokens": 24, "temperature": 0, "guided_json": schema}),
        json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}),
        json!({"model": "smollm2", "prompt": "Pick one:", "max_tokens": 8, "temperature": 0, "guided_choice": ["alpha", "beta"]}),
    ];
    let mut alone = Vec::new();
    for b in &bodies {
        let (status, v) = post(&c, url.clone(), b.clone()).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["text"].clone());
    }
    let together = join_all(bodies.iter().map(|b| post(&c, url.clone(), b.clone()))).await;
    for (i, (status, v)) in together.into_iter().enumerate() {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], alone[i], "request {i} batched with the others");
    }
    check(&schema, alone[1].as_str().unwrap(), "mixed batch");
    // What cannot compile is a 400 naming the parameter and the construct.
    for (body, param, construct) in [
        (json!({"guided_json": {"type": "object", "not": {"required": ["a"]}}}), "guided_json", "not"),
        (json!({"guided_regex": "(unclosed"}), "guided_regex", "unclosed"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": true}}}}),
            "response_format",
            "uniqueItems",
        ),
        (json!({"guided_grammar": "start: missing_rule"}), "guided_grammar", "missing_rule"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
            "schema",
        ),
        (json!({"guided_regex": "a", "guided_choice": ["b"]}), "guided_choice", "only one"),
    ] {
        let mut b = json!({"model": "smollm2", "prompt": "x", "max_tokens": 4});
        b.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let (status, v) = post(&c, url.clone(), b).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(construct), "{body}: {v}");
    }
}

/// `tool_choice: auto` with the Hermes parser: the model's text (here forced by a choice
/// constraint to be a Hermes call) is read back into `tool_calls`, plain and streamed; without
/// the flags, `auto` is a 400 naming them (vLLM's rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tool_calls_are_parsed_and_need_the_flags() {
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chatml_tools.jinja");
    let template = template.to_str().unwrap();
    let flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--chat-template", template];
    let (_running, base) = start(&flags).await;
    let c = client();
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Weather in Rome?"}],
                      "tools": tools, "max_tokens": 40, "temperature": 0, "guided_choice": [call]});
    let (status, v) = post(&c, format!("{base}/v1/chat/completions"), body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let ch = &v["choices"][0];
    assert_eq!(ch["finish_reason"], "tool_calls", "{v}");
    assert!(ch["message"]["content"].is_null(), "{v}");
    let tc = &ch["message"]["tool_calls"][0];
    assert_eq!((tc["type"].as_str(), tc["function"]["name"].as_str()), (Some("function"), Some("get_weather")), "{v}");
    let args: Value = serde_json::from_str(tc["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Rome"}));
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = sse_events(c.post(format!("{base}/v1/chat/completions")).json(&streamed).send().await.unwrap()).await;
    let chunks: Vec<Value> =
        events.iter().filter(|e| e.as_str() != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "{last}");
    assert_eq!(last["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"], tc["function"]["arguments"]);
    drop(_running);

    let (_plain, base) = start(&[]).await;
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "tools": tools});
    let (status, v) = post(&c, format!("{base}/v1/chat/completions"), body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "tool_choice", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--enable-auto-tool-choice"), "{v}");
}
