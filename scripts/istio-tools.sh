#!/usr/bin/env bash
# Builds the pinned real Istio binaries (pilot-agent, istioctl) that the interop tests run against our servers.
# They live in a cache outside the work tree so a fresh clone (CI) reuses them; a binary is built only when missing.
#   scripts/istio-tools.sh                  build what is missing; prints one line per tool built, nothing otherwise
#   scripts/istio-tools.sh pilot-discovery  the same, and also istiod's binary (bench/vs_istiod.py, tests/interop/test_sidecar_vs_istiod.py)
#   scripts/istio-tools.sh --bin-dir        print the folder the binaries go to (builds nothing)
# Layout: ${ZTDPU_CACHE:-~/.cache/ztdpu}/tools/istio-<pin>/{bin/pilot-agent,bin/istioctl,share/envoy_bootstrap_tmpl.json}
#   (+ bin/pilot-discovery when asked for)
# Env: ZTDPU_CACHE; GOPROXY, GOMODCACHE, GOCACHE as the go command reads them.
set -euo pipefail

# istio.io/istio tags ("1.31.0") are not semver, so the module proxy serves the project only as pseudo-versions
# (it refuses tag and branch queries); this one is a commit of the 1.31 line: its VERSION file says 1.31, it needs
# go >= 1.26.0 and istio.io/api v1.31.0-rc.0+.
ISTIO_PIN="v0.0.0-20260827124520-eed52ebb66ad"
ISTIO_LINE="1.31"
MODULE="istio.io/istio"
TOOLS=(
  "pilot-agent $MODULE/pilot/cmd/pilot-agent"
  "istioctl $MODULE/istioctl/cmd/istioctl"
)

cache="${ZTDPU_CACHE:-${HOME:?HOME or ZTDPU_CACHE must be set}/.cache/ztdpu}"
root="$cache/tools/istio-$ISTIO_PIN"
bin_dir="$root/bin"
template="$root/share/envoy_bootstrap_tmpl.json"

if [ "${1:-}" = "--bin-dir" ]; then
  echo "$bin_dir"
  exit 0
fi
for extra in "$@"; do
  case "$extra" in
    pilot-discovery) TOOLS+=("pilot-discovery $MODULE/pilot/cmd/pilot-discovery") ;;
    *)
      echo "usage: $0 [--bin-dir | pilot-discovery]" >&2
      exit 2
      ;;
  esac
done

complete() {
  local tool
  for tool in "${TOOLS[@]}"; do
    [ -x "$bin_dir/${tool%% *}" ] || return 1
  done
  [ -f "$template" ]
}
complete && exit 0

command -v go >/dev/null || { echo "istio-tools: the go command is not on PATH" >&2; exit 1; }
mkdir -p "$bin_dir" "$root/share"
# One builder at a time: a second caller waits here, then finds everything present.
exec 9>"$root/.lock"
flock 9
complete && exit 0

export CGO_ENABLED=0
# -mod=mod last so it wins over anything in the caller's GOFLAGS.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
rev="${ISTIO_PIN##*-}"
ldflags="-s -w -X istio.io/istio/pkg/version.buildVersion=${ISTIO_LINE}-dev -X istio.io/istio/pkg/version.buildGitRevision=${rev}"

stage="$(mktemp -d "$root/.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

for tool in "${TOOLS[@]}"; do
  name="${tool%% *}"
  pkg="${tool#* }"
  [ -x "$bin_dir/$name" ] && continue
  start=$SECONDS
  if ! GOBIN="$stage" go install -trimpath -ldflags="$ldflags" "$pkg@$ISTIO_PIN" >"$stage/build.log" 2>&1; then
    echo "istio-tools: building $name ($pkg@$ISTIO_PIN) failed; last lines of the go output:" >&2
    tail -n 20 "$stage/build.log" >&2
    exit 1
  fi
  # rename(2) within one file system: a reader never sees a half-written binary.
  mv -f "$stage/$name" "$bin_dir/$name"
  echo "built $name istio@$ISTIO_PIN in $((SECONDS - start))s -> $bin_dir/$name"
done

if [ ! -f "$template" ]; then
  # pilot-agent renders Envoy's bootstrap from this template (the image ships it as
  # /var/lib/istio/envoy/envoy_bootstrap_tmpl.json); take the one from the same source as the binary.
  if ! dir="$(go mod download -json "$MODULE@$ISTIO_PIN" 2>"$stage/download.log" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')" \
    || [ ! -f "$dir/tools/packaging/common/envoy_bootstrap.json" ]; then
    echo "istio-tools: cannot find $MODULE@$ISTIO_PIN's envoy_bootstrap.json in the module cache" >&2
    cat "$stage/download.log" >&2
    exit 1
  fi
  cp "$dir/tools/packaging/common/envoy_bootstrap.json" "$stage/envoy_bootstrap_tmpl.json"
  chmod 0644 "$stage/envoy_bootstrap_tmpl.json"
  mv -f "$stage/envoy_bootstrap_tmpl.json" "$template"
  echo "copied envoy bootstrap template of istio@$ISTIO_PIN -> $template"
fi
