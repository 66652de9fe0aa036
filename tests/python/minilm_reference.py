#!/usr/bin/env python3
"""An independent reference for the embedding tests: all-MiniLM-L6-v2 written out in numpy
(float64) over the same safetensors, tokenised by Hugging Face's `tokenizers` package.

    minilm_reference.py MODEL_DIR < sentences.json > embeddings.json

BERT: word + position + token-type embeddings, LayerNorm; per layer self-attention (12 heads),
residual + LayerNorm, GELU (erf) MLP, residual + LayerNorm; mean pooling over the tokens;
L2 normalisation (the model's sentence-transformers modules).
"""
import json
import math
import struct
import sys

import numpy as np
from tokenizers import Tokenizer


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(t["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def embed(W, cfg, ids):
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d, eps = h // heads, cfg["layer_norm_eps"]
    n = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:n] \
        + W["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda t, name: t @ W[p + name + ".weight"].T + W[p + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, h)
        x = layer_norm(lin(a, "attention.output.dense") + x,
                       W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        u = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(lin(u, "output.dense") + x, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    v = x.mean(0)
    return v / np.linalg.norm(v)


def main():
    model = sys.argv[1]
    cfg = json.load(open(f"{model}/config.json"))
    W = load(f"{model}/model.safetensors")
    tok = Tokenizer.from_file(f"{model}/tokenizer.json")
    tok.no_padding()
    tok.no_truncation()
    sentences = json.load(sys.stdin)
    out = [{"ids": tok.encode(s).ids, "embedding": embed(W, cfg, tok.encode(s).ids).tolist()} for s in sentences]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
