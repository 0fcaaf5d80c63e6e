#!/usr/bin/env bash
# Runs every check CI runs: the test suite, ruff and mypy (tox envs tests, lint, type).
# Installs what it needs itself into ./.venv-tools (tox) and ./.tox (the environments).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
if [ ! -x .venv-tools/bin/tox ]; then
  python3 -m venv .venv-tools
  .venv-tools/bin/pip install -q --disable-pip-version-check "tox>=4.20,<5"
fi
exec .venv-tools/bin/tox run -e tests,lint,type -- "$@"
