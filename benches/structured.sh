#!/usr/bin/env bash
# Structured outputs under load: Tessera's output tok/s at 32 streamed requests of 64 tokens,
# free and with a JSON schema on every request (response_format json_schema), in turns, ROUNDS
# rounds (median shown), then the ratio (target: constrained >= 90% of free).
#
#   benches/structured.sh                    # SmolLM2-135M Q4_1 (scripts/fetch-models.sh)
#   ROUNDS=5 CONCURRENCY=32 benches/structured.sh
#
# The schema asks for at least 30 short strings, so no answer can end before 64 tokens: both
# runs generate the same number of tokens per request.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-$(scripts/fetch-models.sh)}"
THREADS="${THREADS:-$(nproc)}"
C="${CONCURRENCY:-32}"
cargo build --release --quiet -p tessera
source benches/serving/common.sh
SCHEMA='{"type":"object","properties":{"items":{"type":"array","items":{"type":"string","maxLength":24},"minItems":30}},"required":["items"],"additionalProperties":false}'
TP=$(port)
target/release/tessera serve "$MODEL" --host 127.0.0.1 --port "$TP" --threads "$THREADS" \
  --served-model-name smollm2 --max-model-len 2048 >"$out/tessera.log" 2>&1 &
pids+=($!)
wait_ready "$TP" "$!" "$out/tessera.log"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $THREADS; model $(basename "$MODEL"); $C streams"
python3 benches/serving/load.py "http://127.0.0.1:$TP" --concurrency 1 --requests 1 --max-tokens 8 >/dev/null
for _ in $(seq 1 "${ROUNDS:-3}"); do
  python3 benches/serving/load.py "http://127.0.0.1:$TP" --concurrency "$C" --requests $((C * 2)) >>"$out/free.jsonl"
  python3 benches/serving/load.py "http://127.0.0.1:$TP" --concurrency "$C" --requests $((C * 2)) \
    --json-schema "$SCHEMA" >>"$out/schema.jsonl"
done
python3 - "$out/free.jsonl" "$out/schema.jsonl" <<'PY'
import json, statistics, sys
rows = [[json.loads(l) for l in open(f)] for f in sys.argv[1:3]]
for name, rs in zip(["free", "json schema"], rows):
    med = sorted(rs, key=lambda r: r["output_tok_s"])[len(rs) // 2]
    rounds = ", ".join("%.1f" % r["output_tok_s"] for r in rs)
    print(f"{name:12s} tok/s {med['output_tok_s']:7.1f} (rounds {rounds})"
          f"  TTFT p50 {med['ttft_p50_ms']:.0f} ms  ITL p50 {med['itl_p50_ms']:.1f} ms  failed {sum(r['failed'] for r in rs)}")
free, schema = (statistics.median(r["output_tok_s"] for r in rs) for rs in rows)
print(f"constrained / free = {schema / free:.3f} (target >= 0.90)")
PY
