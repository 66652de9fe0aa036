#!/usr/bin/env bash
# Multi-LoRA under load: Tessera's output tok/s at 32 streamed requests of 64 tokens with 0
# adapters (the base model), 1 adapter, and 4 distinct adapters in the batch (requests cycle
# through them), ROUNDS rounds each (median shown). Four random rank-8 adapters on all seven
# projections are written by benches/serving/make_adapter.py and served with --lora-modules
# --max-loras 4 (no weight merging: each batch mixes adapters through the grouped LoRA matmul).
#
#   benches/lora.sh                      # SmolLM2-135M Q4_1 (scripts/fetch-models.sh)
#   ROUNDS=5 CONCURRENCY=32 benches/lora.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-$(scripts/fetch-models.sh)}"
HF="${HF:-$(dirname "$MODEL")/SmolLM2-135M-Instruct-hf}"
THREADS="${THREADS:-$(nproc)}"
C="${CONCURRENCY:-32}"
cargo build --release --quiet -p tessera
source benches/serving/common.sh
modules=()
for i in 0 1 2 3; do
  python3 benches/serving/make_adapter.py "$HF/config.json" "$out/a$i" --seed "$i"
  modules+=("a$i=$out/a$i")
done
TP=$(port)
target/release/tessera serve "$MODEL" --host 127.0.0.1 --port "$TP" --threads "$THREADS" \
  --served-model-name smollm2 --max-model-len 2048 --enable-lora --max-loras 4 \
  --lora-modules "${modules[@]}" >"$out/tessera.log" 2>&1 &
pids+=($!)
wait_ready "$TP" "$!" "$out/tessera.log"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $THREADS; model $(basename "$MODEL"); $C streams"
for m in smollm2 a0 a0,a1,a2,a3; do
  python3 benches/serving/load.py "http://127.0.0.1:$TP" --model "$m" --concurrency 1 --requests 1 --max-tokens 8 >/dev/null
done
for _ in $(seq 1 "${ROUNDS:-3}"); do
  python3 benches/serving/load.py "http://127.0.0.1:$TP" --concurrency "$C" --requests $((C * 2)) >>"$out/0.jsonl"
  python3 benches/serving/load.py "http://127.0.0.1:$TP" --concurrency "$C" --requests $((C * 2)) \
    --model a0 >>"$out/1.jsonl"
  python3 benches/serving/load.py "http://127.0.0.1:$TP" --concurrency "$C" --requests $((C * 2)) \
    --model a0,a1,a2,a3 >>"$out/4.jsonl"
done
python3 - "$out/0.jsonl" "$out/1.jsonl" "$out/4.jsonl" <<'PY'
import json, statistics, sys
rows = [[json.loads(l) for l in open(f)] for f in sys.argv[1:4]]
base = statistics.median(r["output_tok_s"] for r in rows[0])
for name, rs in zip(["0 adapters", "1 adapter", "4 adapters"], rows):
    med = sorted(rs, key=lambda r: r["output_tok_s"])[len(rs) // 2]
    rounds = ", ".join("%.1f" % r["output_tok_s"] for r in rs)
    print(f"{name:11s} tok/s {med['output_tok_s']:7.1f} (rounds {rounds}; {med['output_tok_s'] / base:.2f}x base)"
          f"  TTFT p50 {med['ttft_p50_ms']:.0f} ms  ITL p50 {med['itl_p50_ms']:.1f} ms  failed {sum(r['failed'] for r in rs)}")
PY
