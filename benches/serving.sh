#!/usr/bin/env bash
# The serving benchmark: Tessera and llama.cpp's own `llama-server` (continuous batching,
# --parallel 32) on the same GGUF with the same threads, in one run, side by side.
#
#   benches/serving.sh                 # SmolLM2-135M Q4_1 (scripts/fetch-models.sh)
#   MODEL=path.gguf THREADS=2 benches/serving.sh
#   LOAD_FLAGS=--repeat-prompts QUALITY=0 benches/serving.sh   # the same few prompts again and again
#   ROUNDS=5 benches/serving.sh        # rounds per level (default 3; the median is shown)
#
# Prints, for each server: output tok/s, TTFT p50/p99 and ITL p50/p99 at 1, 8 and 32 streamed
# requests of 64 tokens (distinct prompts: benches/serving/load.py), prefill tok/s on a
# 512-token prompt, peak RSS; then Tessera/llama.cpp
# ratios. Then the quality line: perplexity of llama.cpp's `llama-perplexity` and of Tessera
# (prompt log-probabilities over HTTP, same tokens, same method) on the GPL-3 text, -c 512, on
# the GGUF; and Tessera's f32 path (the derived safetensors copy) with the default f16 KV cache
# and with an f32 one (QUALITY=0 skips this part; TEXT=file changes the text).
# Builds llama.cpp once (benches/serving/llama-cpp.sh, cached) and Tessera in release.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-$(scripts/fetch-models.sh)}"
THREADS="${THREADS:-$(nproc)}"
LEVELS="${LEVELS:-1 8 32}"
LLAMA_BIN=$(benches/serving/llama-cpp.sh)
cargo build --release --quiet -p tessera
source benches/serving/common.sh

# Where the CPU advertises AMX, llama.cpp's native build uses AMX tiles through its repacked
# buffers; under VMs that do not grant AMX state that dies with SIGILL, so repacking is off there.
LLAMA_EXTRA="${LLAMA_EXTRA:-$(grep -qw amx_tile /proc/cpuinfo && echo --no-repack || true)}"
LP=$(port); TP=$(port)
LD_LIBRARY_PATH="$LLAMA_BIN" "$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --parallel 32 -c 32768 --host 127.0.0.1 --port "$LP" $LLAMA_EXTRA \
  >"$out/llama.log" 2>&1 &
pids+=($!); LPID=$!
target/release/tessera serve "$MODEL" --host 127.0.0.1 --port "$TP" --threads "$THREADS" \
  --served-model-name smollm2 --max-model-len 2048 >"$out/tessera.log" 2>&1 &
pids+=($!); TPID=$!
wait_ready "$LP" "$LPID" "$out/llama.log"; wait_ready "$TP" "$TPID" "$out/tessera.log"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $THREADS; model $(basename "$MODEL"); llama-server extra flags: ${LLAMA_EXTRA:-none}"
grep -m1 "kernels:" "$out/tessera.log" | sed 's/.*kernels:/tessera kernels:/' || true

for name in llama tessera; do
  port=$([ $name = llama ] && echo "$LP" || echo "$TP")
  # Warm-up: one short request.
  python3 benches/serving/load.py "http://127.0.0.1:$port" --concurrency 1 --requests 1 --max-tokens 8 >/dev/null
done
# ROUNDS rounds, the two servers in turn at each level: the table shows each level's median
# round (shared machines drift; one round can be hit by a noisy neighbour).
for _ in $(seq 1 "${ROUNDS:-3}"); do
  for c in $LEVELS; do
    n=$(( c * 2 > 8 ? c * 2 : 8 ))
    for name in llama tessera; do
      port=$([ $name = llama ] && echo "$LP" || echo "$TP")
      python3 benches/serving/load.py "http://127.0.0.1:$port" --concurrency "$c" --requests "$n" ${LOAD_FLAGS:-} >>"$out/$name.jsonl"
    done
  done
  for name in llama tessera; do
    port=$([ $name = llama ] && echo "$LP" || echo "$TP")
    python3 benches/serving/load.py "http://127.0.0.1:$port" --prefill-tokens 512 >>"$out/$name.prefill"
  done
done
rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
echo "$(rss "$LPID")" >"$out/llama.rss"; echo "$(rss "$TPID")" >"$out/tessera.rss"

if [ "${QUALITY:-1}" != 0 ]; then
  TEXT="${TEXT:-/usr/share/common-licenses/GPL-3}"
  HF="$(dirname "$MODEL")/SmolLM2-135M-Instruct-hf"
  ppl() { python3 benches/serving/perplexity.py "$TEXT" --url "http://127.0.0.1:$1" --tokenizer-url "http://127.0.0.1:$LP" --ctx 512; }
  LD_LIBRARY_PATH="$LLAMA_BIN" "$LLAMA_BIN/llama-perplexity" -m "$MODEL" -f "$TEXT" -c 512 -t "$THREADS" $LLAMA_EXTRA \
    >"$out/llama.ppl.log" 2>&1
  grep -o 'Final estimate: PPL = [0-9.]*' "$out/llama.ppl.log" | awk '{print "{\"ppl\": " $NF "}"}' >"$out/llama.ppl"
  ppl "$TP" >"$out/tessera.ppl"
  if [ -f "$HF/model.safetensors" ]; then
    for kv in auto float32; do
      FP=$(port)
      target/release/tessera serve "$HF" --host 127.0.0.1 --port "$FP" --threads "$THREADS" --served-model-name smollm2 \
        --max-model-len 2048 --kv-cache-dtype "$kv" >"$out/f32-$kv.log" 2>&1 &
      pids+=($!)
      wait_ready "$FP" "$!" "$out/f32-$kv.log"
      ppl "$FP" >"$out/f32-$kv.ppl"
      kill "$!" 2>/dev/null || true
    done
  fi
fi

python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
def median_by(items, key):
    items = sorted(items, key=key)
    return items[len(items) // 2], items
runs = {n: [json.loads(l) for l in open(os.path.join(d, n + ".jsonl"))] for n in ("llama", "tessera")}
rows, spread = {}, {}
for n, rs in runs.items():
    rows[n] = []
    for c in dict.fromkeys(r["concurrency"] for r in rs):
        med, all_ = median_by([r for r in rs if r["concurrency"] == c], lambda r: r["output_tok_s"])
        rows[n].append(med)
        spread[n, c] = (all_[0]["output_tok_s"], all_[-1]["output_tok_s"], len(all_))
pre = {n: median_by([json.loads(l) for l in open(os.path.join(d, n + ".prefill"))], lambda r: r["prefill_tok_s"])[0]
       for n in rows}
rss = {n: int(open(os.path.join(d, n + ".rss")).read().strip() or 0) for n in rows}
f = lambda v: "-" if v is None else f"{v:.1f}"
print("each level: the median of its rounds by tok/s (that round's latencies), and the rounds' tok/s range")
print(f"{'server':9} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'failed':>6}  rounds")
for n in rows:
    for r in rows[n]:
        lo, hi, k = spread[n, r["concurrency"]]
        failed = sum(x["failed"] for x in runs[n] if x["concurrency"] == r["concurrency"])
        print(f"{n:9} {r['concurrency']:>4} {f(r['output_tok_s']):>8} {f(r['ttft_p50_ms']):>9} {f(r['ttft_p99_ms']):>9} "
              f"{f(r['itl_p50_ms']):>8} {f(r['itl_p99_ms']):>8} {failed:>6}  {k}: {lo:.1f}-{hi:.1f}")
    print(f"{n:9} prefill 512 tokens: {pre[n]['prefill_tok_s']:.0f} tok/s; peak RSS {rss[n] / 1024:.0f} MiB")
print("ratios tessera / llama-server:")
for a, b in zip(rows["tessera"], rows["llama"]):
    print(f"  {a['concurrency']:>2} streams: output tok/s {a['output_tok_s'] / b['output_tok_s']:.2f}x; "
          f"TTFT p50 {a['ttft_p50_ms']:.0f} vs {b['ttft_p50_ms']:.0f} ms")
print(f"  prefill tok/s {pre['tessera']['prefill_tok_s'] / pre['llama']['prefill_tok_s']:.2f}x")
t = {r["concurrency"]: r["output_tok_s"] for r in rows["tessera"]}
if 1 in t and 32 in t:
    print(f"  tessera 32 streams / its own 1 stream: {t[32] / t[1]:.2f}x")
ppl = lambda n: json.load(open(os.path.join(d, n + ".ppl")))["ppl"] if os.path.exists(os.path.join(d, n + ".ppl")) else None
lp, tp = ppl("llama"), ppl("tessera")
if lp and tp:
    print(f"quality (GPL-3 text, -c 512, second half of each chunk scored): perplexity llama-perplexity {lp:.4f}, "
          f"tessera {tp:.4f} ({(tp / lp - 1) * 100:+.2f}%) on the GGUF")
f16, f32 = ppl("f32-auto"), ppl("f32-float32")
if f16 and f32:
    print(f"  tessera f32 weights: {f16:.4f} with the f16 KV cache, {f32:.4f} with an f32 one ({(f16 / f32 - 1) * 100:+.3f}%)")
PY
