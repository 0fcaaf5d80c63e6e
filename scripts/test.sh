#!/usr/bin/env bash
# Runs every check CI runs: the test suite, ruff and mypy (tox envs tests, lint, type).
# Installs what it needs itself into ./.venv-tools (tox) and ./.tox (the environments).
set -euo pipefail
cd "$(dirname "$0")/.."
# Host tools the tests drive: openssl (CA checks), iptables (Istio's own istio-iptables capture rules in the
# sidecar tests' network namespaces; pilot-agent runs iptables-nft or -legacy, both come with the package).
need=()
command -v openssl >/dev/null || need+=(openssl)
PATH="$PATH:/usr/sbin:/sbin" command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; fi
# On a cold machine the real Istio and Kubernetes binaries and the project's UML kernel take minutes to build:
# start all three now, while tox installs, instead of one after the other when a test first needs them. The
# scripts hold a lock, so a test that needs one waits for this build rather than starting its own; on a warm
# cache they return at once.
cache="${ZTDPU_CACHE:-$HOME/.cache/ztdpu}"
mkdir -p "$cache"
prefetch=()
scripts/uml-kernel.sh >"$cache/prefetch-kernel.log" 2>&1 & prefetch+=($!)
if command -v go >/dev/null; then
  scripts/istio-tools.sh pilot-discovery >"$cache/prefetch-istio.log" 2>&1 & prefetch+=($!)
  scripts/kube-tools.sh >"$cache/prefetch-kube.log" 2>&1 & prefetch+=($!)
fi
if [ ! -x .venv-tools/bin/tox ]; then
  python3 -m venv .venv-tools
  .venv-tools/bin/pip install -q --disable-pip-version-check "tox>=4.20,<5"
fi
status=0
.venv-tools/bin/tox run -e tests,lint,type -- "$@" || status=$?
# A build that failed was reported by the test that needed it; do not leave one running behind us.
for pid in "${prefetch[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
exit "$status"
