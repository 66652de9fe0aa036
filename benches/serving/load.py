#!/usr/bin/env python3
"""Streamed-completion load against an OpenAI-compatible server (standard library only).

    load.py BASE_URL --concurrency N --requests R [--max-tokens 64] [--model NAME]
    load.py BASE_URL --prefill-tokens 512           # one prompt of ~N tokens, max_tokens 1
    load.py BASE_URL --prompt-tokens 256 --header x-prefiller-host-port:HOST:PORT
                                                    # longer prompts; extra request headers
    load.py BASE_URL --concurrency 32 --json-schema '{"type": "object", ...}'
                                                    # structured outputs on every request

Every request's prompt is one of a few instructions under a tag unique to the run and the
request (no server can answer it from a cached prompt: the figures measure batching and
compute, as vLLM's serving benchmark does with its random prompts); `--repeat-prompts` sends
the bare instructions again and again instead (a prompt-cache workload).

Prints one JSON line: output tok/s over the run's wall time, TTFT and inter-token latency
percentiles (ms), completed and failed requests. Each worker thread keeps one request in
flight, so N threads hold the concurrency at N. Tokens are counted from the stream's chunks
(one token per chunk on both servers) and checked against the final usage when given.
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List some ideas for a weekend trip in the mountains, with reasons.",
    "Describe the water cycle and why it matters for farming.",
    "What are the pros and cons of working from home? Discuss both sides.",
    "Tell me about the history of the printing press and its effects.",
    "Give advice to someone learning to cook for the first time.",
    "Summarise the rules of chess for a beginner.",
]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


HEADERS = {}
EXTRA = {}
FILLER = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree "
          "and the river runs past the mill toward the sea ").split()


def filler(n):
    """~n tokens of plain English (about one token per word for these words)."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(n))


def one(base, model, prompt, max_tokens):
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}, **EXTRA}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json", **HEADERS})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    times, usage = [], None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"]
        ch = ev.get("choices") or []
        if ch and (ch[0].get("text") or "") != "":
            times.append(time.perf_counter())
    conn.close()
    n = usage["completion_tokens"] if usage else len(times)
    return t0, times, n


def run(args):
    lock = threading.Lock()
    res = {"ttft": [], "itl": [], "tokens": 0, "done": 0, "failed": 0, "errors": []}
    counter = iter(range(args.requests))
    models = args.model.split(",")
    run_tag = time.time_ns() % 1_000_000_007

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            prompt = PROMPTS[i % len(PROMPTS)]
            if args.prompt_tokens:
                prompt = f"{filler(args.prompt_tokens)}\n{prompt}"
            if not args.repeat_prompts:
                prompt = f"[{run_tag}-{i}] {prompt}"
            try:
                model = models[i % len(models)]
                t0, times, n = one(args.base, model, prompt, args.max_tokens)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                with lock:
                    res["failed"] += 1
                    res["errors"].append(str(e)[:200])
                continue
            with lock:
                res["done"] += 1
                res["tokens"] += n
                if times:
                    res["ttft"].append((times[0] - t0) * 1000)
                    res["itl"].extend((b - a) * 1000 for a, b in zip(times, times[1:]))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out = {"concurrency": args.concurrency, "requests": args.requests, "done": res["done"],
           "failed": res["failed"], "output_tok_s": res["tokens"] / wall, "wall_s": wall,
           "ttft_p50_ms": pct(res["ttft"], 50), "ttft_p99_ms": pct(res["ttft"], 99),
           "itl_p50_ms": pct(res["itl"], 50), "itl_p99_ms": pct(res["itl"], 99),
           "errors": res["errors"][:3]}
    print(json.dumps(out))


def prefill(args):
    prompt = filler(args.prefill_tokens)
    best = None
    for _ in range(3):
        # A fresh first token each time: neither server may reuse a cached prefix.
        t0, times, _ = one(args.base, args.model, f"{time.time_ns()} " + prompt, 1)
        dt = (times[0] if times else time.perf_counter()) - t0
        best = dt if best is None else min(best, dt)
    print(json.dumps({"prefill_tokens": args.prefill_tokens, "best_s": best,
                      "prefill_tok_s": args.prefill_tokens / best}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("--model", default="smollm2", help="model name; several comma-separated are used in turn")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=0)
    p.add_argument("--repeat-prompts", action="store_true")
    p.add_argument("--prompt-tokens", type=int, default=0, help="~N tokens of filler before each prompt")
    p.add_argument("--header", action="append", default=[], help="NAME:VALUE, sent with every request")
    p.add_argument("--json-schema", help="a JSON schema every request's output must follow (response_format)")
    args = p.parse_args()
    if args.json_schema:
        EXTRA["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": "bench", "schema": json.loads(args.json_schema)}}
    for h in args.header:
        name, _, value = h.partition(":")
        HEADERS[name.strip()] = value.strip()
    if args.prefill_tokens:
        prefill(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
