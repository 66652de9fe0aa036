#!/usr/bin/env bash
# A real Kubernetes API server for the operator tests: kube-apiserver v1.20.2 built from
# Debian's `kubernetes` source package with Debian's Go 1.19 (cached), run with Debian's
# etcd on loopback.
#
#   scripts/apiserver.sh build   # install packages, build and cache the binary
#   scripts/apiserver.sh start   # build if needed, start etcd + apiserver, write a kubeconfig
#   scripts/apiserver.sh stop
#
# Cache: $TESSERA_APISERVER_CACHE (default ~/.cache/tessera/apiserver). Runtime state and
# the kubeconfig live in $TESSERA_APISERVER_RUN (default /tmp/tessera-apiserver).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${TESSERA_APISERVER_CACHE:-$HOME/.cache/tessera/apiserver}"
RUN="${TESSERA_APISERVER_RUN:-/tmp/tessera-apiserver}"
BIN="$CACHE/kube-apiserver-v1.20.2"
PORT="${TESSERA_APISERVER_PORT:-6443}"
ETCD_PORT="${TESSERA_ETCD_PORT:-2379}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

log() { echo "apiserver: $*" >&2; }

need_packages() {
  local missing=()
  local want=(golang-1.19-go etcd-server rsync dpkg-dev golang-github-modern-go-reflect2-dev openssl xz-utils)
  # Any kubectl will do (some images ship one from another package that owns /usr/bin/kubectl).
  command -v kubectl >/dev/null 2>&1 || want+=(kubernetes-client)
  for p in "${want[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

enable_deb_src() {
  # Source packages come from the same archive as the binary ones: copy the deb stanzas.
  local f=/etc/apt/sources.list.d/tessera-deb-src.sources
  [ -f "$f" ] && return
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | $SUDO tee "$f" >/dev/null
  else
    grep -h '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' | $SUDO tee "${f%.sources}.list" >/dev/null
  fi
  $SUDO apt-get update -qq
}

build() {
  [ -x "$BIN" ] && return
  need_packages
  enable_deb_src
  local work; work=$(mktemp -d /tmp/kube-build.XXXXXX)
  log "fetching Debian's kubernetes source into $work"
  (cd "$work" && apt-get source --download-only kubernetes >/dev/null 2>&1 || apt-get source --download-only kubernetes)
  local orig; orig=$(ls "$work"/kubernetes_*.orig.tar.* | head -n1)
  mkdir -p "$work/src" && tar -xf "$orig" -C "$work/src" --strip-components=1
  local tree="$work/src"
  # The vendored reflect2 v1.0.1 segfaults under Go >= 1.18: use Debian's copy.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod"
  mkdir -p "$work/.go/src/k8s.io"
  ln -s "$tree" "$work/.go/src/k8s.io/kubernetes"
  log "building kube-apiserver (about 5 minutes on 2 cores)"
  (cd "$work/.go/src/k8s.io/kubernetes" && \
    PATH=/usr/lib/go-1.19/bin:$PATH GOPATH="$work/.go" GOPROXY=off GOTOOLCHAIN=local GOFLAGS=-mod=vendor \
    CGO_ENABLED=0 KUBE_GIT_VERSION=v1.20.2 make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1) \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
  mkdir -p "$CACHE"
  cp "$(find "$tree/_output" -name kube-apiserver -type f | head -n1)" "$BIN.part"
  mv "$BIN.part" "$BIN"
  rm -rf "$work"
  log "cached $BIN"
}

healthy() {
  [ -f "$RUN/kubeconfig" ] && curl -skf --max-time 2 -H "Authorization: Bearer tessera-admin-token" \
    "https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1
}

start() {
  if healthy; then echo "$RUN/kubeconfig"; return; fi
  build
  need_packages
  stop_quiet
  mkdir -p "$RUN/certs"
  [ -f "$RUN/sa.key" ] || openssl genrsa -out "$RUN/sa.key" 2048 2>/dev/null
  openssl rsa -in "$RUN/sa.key" -pubout -out "$RUN/sa.pub" 2>/dev/null
  echo 'tessera-admin-token,admin,admin,system:masters' > "$RUN/tokens.csv"
  rm -rf "$RUN/etcd"
  etcd --data-dir "$RUN/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    >"$RUN/etcd.log" 2>&1 &
  echo $! > "$RUN/etcd.pid"
  "$BIN" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 --secure-port="$PORT" \
    --cert-dir="$RUN/certs" --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$RUN/sa.pub" --service-account-signing-key-file="$RUN/sa.key" \
    --token-auth-file="$RUN/tokens.csv" --authorization-mode=RBAC --service-cluster-ip-range=10.96.0.0/16 \
    --advertise-address=127.0.0.1 >"$RUN/apiserver.log" 2>&1 &
  echo $! > "$RUN/apiserver.pid"
  cat > "$RUN/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$PORT
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: tessera-admin-token
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
current-context: test
KC
  for _ in $(seq 1 60); do
    if healthy; then echo "$RUN/kubeconfig"; return; fi
    sleep 0.5
  done
  log "the API server did not become ready; last log lines:"
  tail -n 20 "$RUN/apiserver.log" >&2
  exit 1
}

stop_quiet() {
  for p in apiserver etcd; do
    [ -f "$RUN/$p.pid" ] && kill "$(cat "$RUN/$p.pid")" 2>/dev/null || true
    rm -f "$RUN/$p.pid"
  done
}

case "${1:-start}" in
  build) build ;;
  start) start ;;
  stop) stop_quiet ;;
  *) echo "usage: $0 build|start|stop" >&2; exit 2 ;;
esac
