#!/usr/bin/env python3
"""Write a random PEFT LoRA adapter (standard library only) for a llama-family model.

    make_adapter.py CONFIG_JSON OUT_DIR [--rank 8] [--alpha 16] [--std 0.02] [--seed 1]

All seven projections (q, k, v, o, gate, up, down) of every layer, saved as PEFT does:
`adapter_config.json` and `adapter_model.safetensors` with `base_model.model.` names.
"""
import argparse
import array
import json
import os
import random
import struct


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    cfg = json.load(open(a.config))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    targets = [("self_attn", "q_proj", q, h), ("self_attn", "k_proj", kv, h), ("self_attn", "v_proj", kv, h),
               ("self_attn", "o_proj", h, q), ("mlp", "gate_proj", inter, h), ("mlp", "up_proj", inter, h),
               ("mlp", "down_proj", h, inter)]
    rng = random.Random(a.seed)
    header, blobs, at = {}, [], 0
    for layer in range(cfg["num_hidden_layers"]):
        for module, proj, out, inp in targets:
            base = f"base_model.model.model.layers.{layer}.{module}.{proj}"
            for name, shape in ((f"{base}.lora_A.weight", [a.rank, inp]), (f"{base}.lora_B.weight", [out, a.rank])):
                n = shape[0] * shape[1]
                data = array.array("f", (rng.gauss(0.0, a.std) for _ in range(n))).tobytes()
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + len(data)]}
                blobs.append(data)
                at += len(data)
    os.makedirs(a.out, exist_ok=True)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(a.out, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    conf = {"peft_type": "LORA", "r": a.rank, "lora_alpha": a.alpha, "bias": "none", "use_rslora": False,
            "target_modules": [t[1] for t in targets], "modules_to_save": None, "task_type": "CAUSAL_LM"}
    json.dump(conf, open(os.path.join(a.out, "adapter_config.json"), "w"))


if __name__ == "__main__":
    main()
