# Shared by benches/serving.sh and benches/pd.sh (sourced): a scratch folder `out`, the
# servers' pids (killed on exit), a free loopback port, and waiting for a server's /health.
out=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {  # PORT PID LOG
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "$(basename "$0"): the server on port $1 exited:" >&2; tail -5 "$3" >&2; return 1; }
    sleep 0.5
  done
  echo "$(basename "$0"): the server on port $1 never became ready" >&2
  return 1
}
