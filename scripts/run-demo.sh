#!/usr/bin/env bash
# Runs ztd on localhost with the embedded registry from examples/mesh, then shows it working:
# a token from `ztctl token create`, a certificate from CreateCertificate, the root from `ztctl ca root`.
# Installs what it needs itself into ./.venv. Ctrl-C stops ztd.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/ztd ] || [ pyproject.toml -nt .venv/bin/ztd ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e .
  touch .venv/bin/ztd
fi
export PATH="$PWD/.venv/bin:$PATH"
state=${ZTD_STATE_DIR:-.ztd}
ztd --state-dir "$state" --config-dir examples/mesh "$@" &
ztd_pid=$!
trap 'kill $ztd_pid 2>/dev/null; wait $ztd_pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do
  python3 -c 'import urllib.request,sys; urllib.request.urlopen("http://127.0.0.1:15014/ready", timeout=1)' \
    2>/dev/null && break
  kill -0 $ztd_pid 2>/dev/null || exit 1
  sleep 0.2
done
echo "--- a token for shop/frontend, like kubectl create token:"
token=$(ztctl token create shop/frontend --state-dir "$state" --duration 1h)
echo "${token:0:40}..."
echo "--- a certificate from CreateCertificate with that token:"
ztctl x ca issue --token "$token" --state-dir "$state" --out-dir "$state/demo-workload"
echo "--- impersonation: the node agent of node-a asks for shop/cart's certificate (cart runs on node-a):"
ztoken=$(ztctl token create istio-system/ztunnel --pod ztunnel-node-a --config-dir examples/mesh --state-dir "$state")
ztctl x ca issue --token "$ztoken" --impersonate spiffe://cluster.local/ns/shop/sa/cart --state-dir "$state" \
  --out-dir "$state/demo-impersonated"
echo "ztd is running (pid $ztd_pid): xDS 127.0.0.1:15010, CA+xDS (TLS) 127.0.0.1:15012, metrics 127.0.0.1:15014/metrics"
echo "Ctrl-C to stop."
wait $ztd_pid
