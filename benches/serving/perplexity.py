#!/usr/bin/env python3
"""Perplexity of a served model through prompt log-probabilities over HTTP (standard library only),
with llama.cpp's `llama-perplexity` method so the two figures compare like for like.

    perplexity.py TEXT_FILE --url TESSERA_URL --tokenizer-url LLAMA_SERVER_URL [--ctx 512]

The text is tokenized once (by llama-server's /tokenize, so both sides score the same token
ids), cut into ctx-token chunks whose first token is set to BOS when the model adds one, and
each chunk is sent as a token prompt with `echo`, `logprobs: 0` and `max_tokens: 0`; only the
second half of each chunk is scored (the first half is context). Prints one JSON line:
{"ppl": ..., "chunks": ..., "scored_tokens": ...}.
"""
import argparse
import http.client
import json
import math
import urllib.parse


def post(base, path, body, timeout=1800):
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{base}{path}: HTTP {r.status}: {data[:300]!r}")
    return json.loads(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("text")
    ap.add_argument("--url", required=True)
    ap.add_argument("--tokenizer-url", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    with_special = post(a.tokenizer_url, "/tokenize", {"content": "a", "add_special": True})["tokens"]
    plain = post(a.tokenizer_url, "/tokenize", {"content": "a", "add_special": False})["tokens"]
    bos = with_special[0] if len(with_special) > len(plain) else None
    tokens = post(a.tokenizer_url, "/tokenize", {"content": text, "add_special": bos is not None})["tokens"]
    n = a.ctx
    first = n // 2
    nll, count, chunks = 0.0, 0, len(tokens) // n
    for c in range(chunks):
        chunk = tokens[c * n:(c + 1) * n]
        if bos is not None:
            chunk[0] = bos
        body = {"model": a.model, "prompt": chunk, "max_tokens": 0, "echo": True, "logprobs": 0}
        lps = post(a.url, "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
        if len(lps) != n:
            raise RuntimeError(f"chunk {c}: {len(lps)} log-probabilities for {n} tokens")
        # llama-perplexity scores the tokens at first+1 .. n-1 (predicted from first .. n-2).
        for lp in lps[first + 1:]:
            nll -= lp
            count += 1
    print(json.dumps({"ppl": math.exp(nll / count), "chunks": chunks, "scored_tokens": count}))


if __name__ == "__main__":
    main()
