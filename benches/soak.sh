#!/usr/bin/env bash
# Sustained load on the release worker, watching its memory: 32 streamed requests in flight
# (distinct prompts, 64 tokens each) for DURATION seconds (default 600), RSS sampled every
# 15 s. Prints the samples and the growth from the end of the first 2 minutes to the end;
# exits 1 if it cannot read the RSS, if any request failed, or if RSS grew by more than
# MAX_GROWTH_MIB (default 32).
#
# The KV cache's pages become resident as blocks are first used (the allocator hands out
# fresh blocks before evicting cached ones), so RSS climbs to model + --kv-cache-memory and
# stays there. The soak uses a KV budget (KV_MEMORY, default 192MiB) that the load fills
# within the 2-minute warm-up, so what it measures after that is everything else.
#
#   benches/soak.sh                       # SmolLM2-135M Q4_1 (scripts/fetch-models.sh)
#   DURATION=120 MODEL=path.gguf benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-$(scripts/fetch-models.sh)}"
DURATION="${DURATION:-600}"
MAX_GROWTH_MIB="${MAX_GROWTH_MIB:-32}"
cargo build --release --quiet -p tessera
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
target/release/tessera serve "$MODEL" --host 127.0.0.1 --port "$PORT" --served-model-name smollm2 \
  --max-model-len 2048 --kv-cache-memory "${KV_MEMORY:-192MiB}" >"$log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.5; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status" 2>/dev/null; }
[ -n "$(rss)" ] || { echo "soak: cannot read the worker's RSS" >&2; exit 1; }
end=$(( $(date +%s) + DURATION ))
( while [ "$(date +%s)" -lt "$end" ]; do
    python3 benches/serving/load.py "http://127.0.0.1:$PORT" --concurrency 32 --requests 64 >>"$log.load"
  done ) &
LOAD=$!
samples=()
while [ "$(date +%s)" -lt "$end" ]; do
  sleep 15
  r=$(rss); [ -n "$r" ] || { echo "soak: the worker's RSS is no longer readable (did it exit?)" >&2; exit 1; }
  samples+=("$r")
  echo "t+$(( DURATION - end + $(date +%s) ))s RSS $(( r / 1024 )) MiB"
done
wait "$LOAD"
failed=$(python3 -c 'import json,sys; print(sum(json.loads(l)["failed"] for l in open(sys.argv[1])))' "$log.load")
done_=$(python3 -c 'import json,sys; print(sum(json.loads(l)["done"] for l in open(sys.argv[1])))' "$log.load")
warm=$(( 120 / 15 )); [ "${#samples[@]}" -gt "$warm" ] || warm=0
base=${samples[$warm]}; last=${samples[-1]}; max=$(printf '%s\n' "${samples[@]:$warm}" | sort -n | tail -1)
growth=$(( (last - base) / 1024 ))
echo "soak: ${DURATION}s at 32 streams, $done_ requests done, $failed failed; RSS after warm-up $(( base / 1024 )) MiB, at the end $(( last / 1024 )) MiB (max $(( max / 1024 )) MiB), growth ${growth} MiB"
[ "$failed" -eq 0 ] || { echo "soak: requests failed" >&2; exit 1; }
[ "$growth" -le "$MAX_GROWTH_MIB" ] || { echo "soak: RSS grew by more than ${MAX_GROWTH_MIB} MiB" >&2; exit 1; }
