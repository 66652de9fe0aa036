#!/usr/bin/env python3
"""OpenAI-compatibility acceptance checks for a running worker, through the official client.

    PY=$(scripts/openai-venv.sh)
    "$PY" tests/python/openai_client.py http://127.0.0.1:8000/v1 smollm2

Prints `ok <check>: <figures>` per check and closes with `N passed, 0 failed`. The first
failed check prints `FAIL <check>: <why>` and `N passed, 1 failed`, and exits 1.
"""
import json
import sys

import openai
import pydantic

CHAT = [{"role": "user", "content": "Name three colours."}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
COUNT = [{"role": "user", "content": "Count from 1 to 50, separated by commas."}]
FRANCE = "The capital of France is"


class Fail(Exception):
    pass


def need(cond, why):
    if not cond:
        raise Fail(why)


def check_usage(u, max_tokens):
    need(u is not None, "no usage in the response")
    need(u.prompt_tokens > 0 and u.completion_tokens > 0, f"usage has a zero count: {u}")
    need(u.prompt_tokens + u.completion_tokens == u.total_tokens, f"prompt + completion != total: {u}")
    need(u.completion_tokens <= max_tokens, f"{u.completion_tokens} completion tokens > max_tokens {max_tokens}")


def joins(tokens, text, finish):
    """The token texts join to the text; a final end-of-sequence token may add a marker of its own."""
    return "".join(tokens) == text or (finish == "stop" and "".join(tokens[:-1]) == text)


def chat(c, m):
    r = c.chat.completions.create(model=m, messages=CHAT, temperature=0, max_tokens=16)
    need(len(r.choices) == 1, f"{len(r.choices)} choices, wanted 1")
    ch, u = r.choices[0], r.usage
    need(ch.message.role == "assistant", f"role {ch.message.role!r}")
    need(ch.message.content, f"empty content: {ch.message.content!r}")
    need(ch.finish_reason in ("stop", "length"), f"finish_reason {ch.finish_reason!r}")
    check_usage(u, 16)
    need(ch.finish_reason != "length" or u.completion_tokens == 16, f"length after {u.completion_tokens} tokens")
    figures = f"{u.prompt_tokens}+{u.completion_tokens}={u.total_tokens} tokens, finish {ch.finish_reason}"
    return f"{figures}, {ch.message.content!r:.50}"


def completions(c, m):
    kw = dict(model=m, prompt=FRANCE, temperature=0, max_tokens=8)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    ta, tb = a.choices[0].text, b.choices[0].text
    need(ta.strip(), f"empty text: {ta!r}")
    need(ta == tb, f"greedy text differs between two calls: {ta!r} vs {tb!r}")
    check_usage(a.usage, 8)
    return f"{a.usage.completion_tokens} tokens, twice {ta!r}"


def chat_stream(c, m):
    kw = dict(model=m, messages=CHAT, temperature=0, max_tokens=16)
    ref = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    need(len(chunks) >= 2, f"only {len(chunks)} chunks")
    *body, last = chunks
    need(len({k.id for k in chunks}) == 1, "chunks carry different ids")
    need(last.usage is not None and last.choices == [], f"last chunk is not a usage-only chunk: {last}")
    need(all(k.usage is None for k in body), "usage on a chunk before the last")
    text = "".join(k.choices[0].delta.content or "" for k in body if k.choices)
    finishes = [k.choices[0].finish_reason for k in body if k.choices and k.choices[0].finish_reason]
    want = ref.choices[0].message.content
    need(text == want, f"streamed text {text!r} != non-streamed {want!r}")
    want_finish = ref.choices[0].finish_reason
    need(finishes == [want_finish], f"stream finish_reasons {finishes}, non-streamed {want_finish}")
    u, ru = last.usage, ref.usage
    same = (u.prompt_tokens, u.completion_tokens) == (ru.prompt_tokens, ru.completion_tokens)
    need(same, f"stream usage {u} != non-streamed {ru}")
    check_usage(u, 16)
    pieces = sum(1 for k in body if k.choices and k.choices[0].delta.content)
    need(1 <= pieces <= u.completion_tokens, f"{pieces} content deltas for {u.completion_tokens} tokens")
    return f"{len(chunks)} chunks, {pieces} content deltas, usage {u.completion_tokens} tokens, text as non-streamed"


def n_choices(c, m):
    kw = dict(model=m, messages=POEM, temperature=1.0, seed=7, n=3, max_tokens=16)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    for r in (a, b):
        indexes = [ch.index for ch in r.choices]
        need(sorted(indexes) == [0, 1, 2], f"choice indexes {indexes}")
        need(3 <= r.usage.completion_tokens <= 48, f"usage.completion_tokens {r.usage.completion_tokens} for n=3")
    texts = [ch.message.content for ch in sorted(a.choices, key=lambda ch: ch.index)]
    again = [ch.message.content for ch in sorted(b.choices, key=lambda ch: ch.index)]
    need(texts == again, f"same seed, different texts: {texts} vs {again}")
    need(len(set(texts)) > 1, f"all 3 choices identical at temperature 1 (one seed per choice?): {texts[0]!r}")
    got, fin = {0: "", 1: "", 2: ""}, {}
    for k in c.chat.completions.create(**kw, stream=True):
        for ch in k.choices:
            need(ch.index in got, f"stream chunk with index {ch.index}")
            need(ch.index not in fin, f"index {ch.index} continues after its finish_reason")
            got[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                fin[ch.index] = ch.finish_reason
    need(sorted(fin) == [0, 1, 2], f"finish_reason only for indexes {sorted(fin)}")
    streamed = [got[i] for i in range(3)]
    need(streamed == texts, f"streamed n=3 texts {streamed} != non-streamed {texts} (same seed)")
    figures = f"indexes 0,1,2, {a.usage.completion_tokens} tokens, {len(set(texts))} distinct texts"
    return f"{figures}, reproducible, stream matches"


def chat_logprobs(c, m):
    kw = dict(model=m, messages=COUNT, temperature=0, max_tokens=5)
    r = c.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    ch = r.choices[0]
    need(ch.logprobs is not None and ch.logprobs.content is not None, "no choices[0].logprobs.content")
    ent, n = ch.logprobs.content, r.usage.completion_tokens
    need(len(ent) == n, f"{len(ent)} logprob entries for {n} completion tokens")
    for i, e in enumerate(ent):
        tops = [t.logprob for t in e.top_logprobs]
        need(e.logprob <= 0, f"token {i} {e.token!r}: logprob {e.logprob} > 0")
        need(len(tops) == 3, f"token {i}: {len(tops)} top_logprobs, wanted 3")
        ordered = all(t <= 0 for t in tops) and tops == sorted(tops, reverse=True)
        need(ordered, f"token {i}: top_logprobs {tops} not <= 0 descending")
        need(abs(e.logprob - tops[0]) <= 1e-4, f"token {i} {e.token!r}: logprob {e.logprob} != top-1 {tops[0]}")
        if e.bytes is not None and "\ufffd" not in e.token:
            need(bytes(e.bytes) == e.token.encode(), f"token {i} {e.token!r}: bytes {e.bytes}")
    tokens, content = [e.token for e in ent], ch.message.content
    need(joins(tokens, content, ch.finish_reason), f"tokens {tokens} do not join to the content {content!r}")
    figs = " ".join(f"{e.token!r}:{e.logprob:.3f}" for e in ent)
    return f"{n} entries x 3 top, greedy = top-1: {figs}"


def completion_logprobs(c, m):
    r = c.completions.create(model=m, prompt=FRANCE, temperature=0, max_tokens=4, logprobs=2)
    ch, n = r.choices[0], r.usage.completion_tokens
    lp = ch.logprobs
    need(lp is not None, "no choices[0].logprobs")
    counts = (len(lp.tokens), len(lp.token_logprobs))
    need(counts == (n, n), f"{counts} tokens / token_logprobs for {n} completion tokens")
    need(isinstance(lp.top_logprobs, list) and len(lp.top_logprobs) == n, f"top_logprobs {lp.top_logprobs!r:.80}")
    need(all(x <= 0 for x in lp.token_logprobs), f"token_logprobs {lp.token_logprobs} not all <= 0")
    for i, (lpi, d) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        need(isinstance(d, dict) and 1 <= len(d) <= 2, f"top_logprobs[{i}] = {d!r}: wanted a dict of 1..2 entries")
        need(abs(lpi - max(d.values())) <= 1e-4, f"token {i}: greedy logprob {lpi} != best of {d}")
    need(joins(lp.tokens, ch.text, ch.finish_reason), f"tokens {lp.tokens} do not join to the text {ch.text!r}")
    if lp.text_offset is not None:
        off = lp.text_offset
        need(len(off) == n, f"{len(off)} text_offset entries for {n} tokens")
        steps = all(off[i + 1] - off[i] == len(lp.tokens[i]) for i in range(n - 1))
        need(steps, f"text_offset {off} does not step by the lengths of tokens {lp.tokens}")
    return f"{n} tokens {lp.tokens}, logprobs {[round(x, 3) for x in lp.token_logprobs]}"


def stop(c, m):
    kw = dict(model=m, prompt=FRANCE, temperature=0, max_tokens=12)
    full = c.completions.create(**kw).choices[0].text
    words = full.split()
    need(len(words) >= 3, f"greedy 12-token text {full!r} has too few words to pick a stop string")
    word = words[len(words) // 2]
    want = full[: full.find(word)]
    r = c.completions.create(**kw, stop=[word])
    got = r.choices[0].text
    need(got == want, f"with stop {word!r}: text {got!r}, wanted {want!r} (full text {full!r})")
    need(r.choices[0].finish_reason == "stop", f"finish_reason {r.choices[0].finish_reason!r} with stop {word!r}")
    chunks = [k for k in c.completions.create(**kw, stop=[word], stream=True) if k.choices]
    streamed = "".join(k.choices[0].text for k in chunks)
    finishes = [k.choices[0].finish_reason for k in chunks if k.choices[0].finish_reason]
    need(streamed == want, f"streamed with stop {word!r}: {streamed!r}, wanted {want!r}")
    need(finishes == ["stop"], f"streamed finish_reasons {finishes}")
    return f"stop {word!r} cuts {full!r} to {want!r}, streamed too"


def seed(c, m):
    kw = dict(model=m, prompt="Once upon a time", temperature=1.0, max_tokens=16)
    a = c.completions.create(**kw, seed=1234).choices[0].text
    b = c.completions.create(**kw, seed=1234).choices[0].text
    other = c.completions.create(**kw, seed=1235).choices[0].text
    need(a == b, f"seed 1234 gave {a!r} then {b!r}")
    return f"seed 1234 twice {a!r}; seed 1235 {'differs' if other != a else 'coincides'}: {other!r}"


def errors(c, m):
    try:
        c.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
        raise Fail("model 'no-such-model' was accepted")
    except openai.NotFoundError as e:
        need(isinstance(e.body, dict) and e.body.get("message"), f"404 body without error.message: {e.body!r}")
        notfound = e.body["message"]
    except openai.APIStatusError as e:
        raise Fail(f"unknown model: HTTP {e.status_code} {type(e).__name__}, wanted 404 NotFoundError")
    try:
        c.chat.completions.create(model=m, messages=CHAT, max_tokens=-1)
        raise Fail("max_tokens=-1 was accepted")
    except openai.BadRequestError as e:
        need(isinstance(e.body, dict) and e.body.get("message"), f"400 body without error.message: {e.body!r}")
        param = e.param
        need(param and "max_tokens" in param, f"400 error.param is {param!r}, wanted it to name max_tokens")
    except openai.APIStatusError as e:
        raise Fail(f"max_tokens=-1: HTTP {e.status_code} {type(e).__name__}, wanted 400 BadRequestError")
    return f"404 {notfound!r:.60}; 400 param={param!r}"


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: int = pydantic.Field(ge=0, le=60)
    landmarks: list[str] = pydantic.Field(max_length=3)


PARIS = [{"role": "user", "content": "Describe Paris as JSON: name, country, population in millions, landmarks."}]


def parse(c, m):
    """Structured outputs through the client's pydantic helper, plain and streamed."""
    r = c.chat.completions.parse(model=m, messages=PARIS, response_format=City, max_tokens=160, temperature=0)
    msg = r.choices[0].message
    need(r.choices[0].finish_reason == "stop", f"finish_reason {r.choices[0].finish_reason!r}: {msg.content!r}")
    need(isinstance(msg.parsed, City), f"no parsed City from {msg.content!r}")
    with c.chat.completions.stream(model=m, messages=PARIS, response_format=City, max_tokens=160,
                                   temperature=0) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.parsed
    need(isinstance(streamed, City), f"no parsed City from the stream: {final.choices[0].message.content!r}")
    need(streamed == msg.parsed, f"streamed {streamed!r} != plain {msg.parsed!r}")
    return f"{msg.parsed!r:.90}"


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(c, **kw):
    """The tool calls and finish reason of a streamed chat completion, joined from its deltas."""
    calls, finish = {}, None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                e = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                e["name"] += d.function.name or ""
                e["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


def tools(c, m):
    """tools -> tool_calls (a named function, then `required`; plain and streamed) -> a `tool`
    message -> the model's answer."""
    seen = []
    for choice in [{"type": "function", "function": {"name": "get_weather"}}, "required"]:
        kw = dict(model=m, messages=ASK, tools=WEATHER, tool_choice=choice, max_tokens=60, temperature=0)
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        need(ch.finish_reason == "tool_calls", f"{choice}: finish_reason {ch.finish_reason!r}: {ch.message}")
        calls = ch.message.tool_calls or []
        need(len(calls) >= 1 and calls[0].type == "function" and calls[0].id, f"{choice}: no tool call: {ch.message}")
        need(calls[0].function.name == "get_weather", f"{choice}: called {calls[0].function.name!r}")
        args = json.loads(calls[0].function.arguments)
        need(isinstance(args.get("city"), str) and set(args) == {"city"}, f"{choice}: arguments {args!r}")
        s_calls, s_finish = streamed_calls(c, **kw)
        need(s_finish == "tool_calls" and s_calls and s_calls[0]["name"] == "get_weather",
             f"{choice}: streamed {s_calls!r}, finish {s_finish!r}")
        need(json.loads(s_calls[0]["arguments"]) == args, f"{choice}: streamed {s_calls[0]['arguments']} != {args}")
        seen.append(args["city"])
    follow = ASK + [ch.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 22 degrees Celsius"}]
    r = c.chat.completions.create(model=m, messages=follow, tools=WEATHER, max_tokens=40, temperature=0)
    answer = r.choices[0].message
    need(answer.content or answer.tool_calls, f"no answer after the tool's result: {answer}")
    # The same answer streamed.
    text, finish = "", None
    for chunk in c.chat.completions.create(model=m, messages=follow, tools=WEATHER, max_tokens=40, temperature=0,
                                           stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    need(text == (answer.content or "") and finish == r.choices[0].finish_reason,
         f"streamed answer {text!r} ({finish}) != {answer.content!r} ({r.choices[0].finish_reason})")
    return f"named/required called get_weather({seen}); answer {answer.content!r:.60}, streamed alike"


CHECKS = [chat, completions, chat_stream, n_choices, chat_logprobs, completion_logprobs, stop, seed, errors, parse, tools]


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8000/v1)")
    base_url, model = sys.argv[1:]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    print(f"# openai {openai.__version__}, {base_url}, model {model}", flush=True)
    for passed, check in enumerate(CHECKS):
        try:
            figures = check(client, model)
        except Fail as e:
            why = str(e)
        except Exception as e:  # an HTTP error, a malformed response, a lost connection
            why = f"{type(e).__name__}: {e}"
        else:
            print(f"ok {check.__name__}: {figures}", flush=True)
            continue
        print(f"FAIL {check.__name__}: {why}", flush=True)
        print(f"{passed} passed, 1 failed")
        sys.exit(1)
    print(f"{len(CHECKS)} passed, 0 failed")


if __name__ == "__main__":
    main()
