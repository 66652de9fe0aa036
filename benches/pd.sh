#!/usr/bin/env bash
# Prefill/decode disaggregation on this machine: one monolithic Tessera worker against a
# prefill worker + a decode worker (the decode worker splits each request itself through
# `x-prefiller-host-port`), same model, the same cores in total (the split pair gets half the
# threads each), in one run. Streamed completions of 64 tokens after ~PROMPT_TOKENS-token
# prompts at 8 and 32 concurrent requests; TTFT and inter-token latency p50/p99.
#
#   benches/pd.sh                        # SmolLM2-135M Q4_1, prompts of ~256 tokens
#   PROMPT_TOKENS=512 ROUNDS=3 LEVELS="8 32" benches/pd.sh
#
# On a 2-core CPU machine the split cannot win (both workers share the cores that one worker
# had); the figures show what the split costs here: the transfer, the extra HTTP leg, and
# half the threads per phase. KV transfer throughput itself: `cargo bench --bench kv_transfer`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-$(scripts/fetch-models.sh)}"
THREADS="${THREADS:-$(nproc)}"
HALF=$(( THREADS / 2 > 0 ? THREADS / 2 : 1 ))
LEVELS="${LEVELS:-8 32}"
PROMPT_TOKENS="${PROMPT_TOKENS:-256}"
cargo build --release --quiet -p tessera
source benches/serving/common.sh
serve() {  # NAME PORT THREADS FLAGS...
  local name=$1 p=$2 t=$3; shift 3
  target/release/tessera serve "$MODEL" --host 127.0.0.1 --port "$p" --threads "$t" --served-model-name smollm2 \
    --max-model-len 2048 "$@" >"$out/$name.log" 2>&1 &
  pids+=($!); wait_ready "$p" "$!" "$out/$name.log"
}
MP=$(port); PP=$(port); DP=$(port)
kv() { echo "{\"kv_connector\":\"TesseraConnector\",\"kv_role\":\"$1\",\"kv_ip\":\"127.0.0.1\",\"kv_port\":0}"; }
serve mono "$MP" "$THREADS"
serve prefill "$PP" "$HALF" --kv-transfer-config "$(kv kv_producer)"
serve decode "$DP" "$HALF" --kv-transfer-config "$(kv kv_consumer)" --trusted-prefillers 127.0.0.1
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $THREADS threads (split: $HALF + $HALF); model $(basename "$MODEL"); prompts ~$PROMPT_TOKENS tokens, 64 out"
load() { python3 benches/serving/load.py "$@" --prompt-tokens "$PROMPT_TOKENS"; }
load "http://127.0.0.1:$MP" --concurrency 1 --requests 1 --max-tokens 8 >/dev/null
load "http://127.0.0.1:$DP" --concurrency 1 --requests 1 --max-tokens 8 --header "x-prefiller-host-port:127.0.0.1:$PP" >/dev/null
for _ in $(seq 1 "${ROUNDS:-1}"); do
  for c in $LEVELS; do
    n=$(( c * 2 ))
    load "http://127.0.0.1:$MP" --concurrency "$c" --requests "$n" >>"$out/mono.jsonl"
    load "http://127.0.0.1:$DP" --concurrency "$c" --requests "$n" --header "x-prefiller-host-port:127.0.0.1:$PP" >>"$out/split.jsonl"
  done
done
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s += $2} END {print s+0}'; }
echo "decode worker: prompt tokens computed $(metric "$DP" tessera:prompt_tokens_computed_total), KV bytes received $(metric "$DP" tessera:kv_transfer_bytes_received_total), fallbacks $(metric "$DP" tessera:kv_transfer_fallbacks_total); pull latency sum $(metric "$DP" tessera:kv_transfer_latency_seconds_sum) s over $(metric "$DP" tessera:kv_transfer_latency_seconds_count) pulls"
python3 - "$out" <<'PY'
import json, os, sys
d = sys.argv[1]
f = lambda v: "-" if v is None else f"{v:.1f}"
print(f"{'setup':6} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'failed':>6}")
for n in ("mono", "split"):
    for l in open(os.path.join(d, n + ".jsonl")):
        r = json.loads(l)
        print(f"{n:6} {r['concurrency']:>4} {f(r['output_tok_s']):>8} {f(r['ttft_p50_ms']):>9} {f(r['ttft_p99_ms']):>9} "
              f"{f(r['itl_p50_ms']):>8} {f(r['itl_p99_ms']):>8} {r['failed']:>6}")
PY
