#!/usr/bin/env bash
# Builds the project's user-mode-linux kernel (Linux 6.1 as an ordinary process) that the kernel tests, the
# UML benches and the demo boot. It lives in a cache outside the work tree, so a fresh clone (CI) reuses it;
# it is built only when missing, once: a second caller waits on the lock and then finds it.
#   scripts/uml-kernel.sh          build when missing, boot it once, print the kernel's path (progress on stderr)
#   scripts/uml-kernel.sh --path   print the path it would have (builds nothing; exit 1 when not built yet)
# Source: Debian bookworm's linux-source-6.1 (apt-get download, the newest the package lists offer), with
# tools/uml-kernel/patches/ applied and tools/uml-kernel/config built in (allnoconfig + that fragment).
# Why not Debian's user-mode-linux package: its 6.1 kernel dies on hosts whose XSAVE area is larger than its
# build-time FP buffer (Intel with AMX), and it has no netdevsim; one kernel built here runs on every x86_64 host.
# Layout: ${ZTDPU_CACHE:-~/.cache/ztdpu}/kernels/uml-6.1-<hash of the build inputs>/{linux,config,version,build.log}
# Env: ZTDPU_CACHE; ZTDPU_KERNEL_JOBS (make -j, default: the number of CPUs).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
inputs="$here/tools/uml-kernel"
cache="${ZTDPU_CACHE:-${HOME:?HOME or ZTDPU_CACHE must be set}/.cache/ztdpu}"
package=linux-source-6.1
# The build inputs name the kernel: change the config, a patch or this script and a new kernel is built.
hash="$(cat "$0" "$inputs/config" "$inputs"/patches/*.patch | sha256sum | cut -c1-12)"
root="$cache/kernels/uml-6.1-$hash"
kernel="$root/linux"

say() { echo "uml-kernel: $*" >&2; }
die() { say "$*"; exit 1; }

case "${1:-}" in
  --path) echo "$kernel"; [ -x "$kernel" ]; exit ;;
  "") ;;
  *) echo "usage: $0 [--path]" >&2; exit 2 ;;
esac
if [ -x "$kernel" ]; then echo "$kernel"; exit 0; fi

mkdir -p "$cache/kernels"
# One builder at a time: a second caller waits here, then finds the kernel.
exec 9>"$cache/kernels/.lock-$hash"
if ! flock -n 9; then
  say "another process is building this kernel; waiting for it"
  flock 9
fi
if [ -x "$kernel" ]; then echo "$kernel"; exit 0; fi

"$here/scripts/install-kernel-deps.sh" >&2 || die "the build or guest tools could not be installed (above)"

start=$SECONDS
stage="$(mktemp -d "$cache/kernels/.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
say "building the test kernel once (Linux 6.1 for ARCH=um from Debian's $package; a few minutes), cached in $root"

# apt-get download needs no root, but the lists may name a version the archive has since replaced.
download() { (cd "$stage" && apt-get download -q "$package" >"$stage/download.log" 2>&1); }
if ! download; then
  say "apt-get download $package failed; refreshing the package lists and retrying"
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  "${sudo[@]}" apt-get update -qq >>"$stage/download.log" 2>&1 || true
  download || { tail -n 5 "$stage/download.log" >&2; die "cannot download $package"; }
fi
deb="$(ls "$stage"/"$package"_*.deb)"
version="$(dpkg-deb -f "$deb" Version)"
say "downloaded $package $version ($((SECONDS - start))s); unpacking"

# All of it but the device trees (Kconfig reads every architecture's and the documentation's Kconfig files).
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$package.tar.xz" \
  | tar -xJ -C "$stage" --exclude="$package/arch/*/boot/dts" \
  || die "unpacking $package failed"
rm -f "$deb"
src="$stage/$package"
for p in "$inputs"/patches/*.patch; do
  patch -d "$src" -p1 --forward --quiet <"$p" >"$stage/patch.log" 2>&1 \
    || { cat "$stage/patch.log" >&2; die "patch $(basename "$p") does not apply to $package $version"; }
done

make -C "$src" -s ARCH=um allnoconfig KCONFIG_ALLCONFIG="$inputs/config" >"$stage/build.log" 2>&1 \
  || { tail -n 20 "$stage/build.log" >&2; die "make allnoconfig failed"; }
# Kconfig silently drops what a dependency forbids: every line of the fragment must have survived.
missing="$(grep -E '^CONFIG_' "$inputs/config" | while IFS= read -r line; do
  grep -qxF "$line" "$src/.config" || echo "$line"
done)"
[ -z "$missing" ] || die "Kconfig did not keep: $(echo "$missing" | tr '\n' ' ')(fix tools/uml-kernel/config)"

jobs="${ZTDPU_KERNEL_JOBS:-$(nproc)}"
say "compiling with make -j$jobs ($((SECONDS - start))s so far)"
make -C "$src" ARCH=um -j"$jobs" linux >>"$stage/build.log" 2>&1 &
make_pid=$!
# Progress, not silence: a line a minute with the objects built so far.
while kill -0 "$make_pid" 2>/dev/null; do
  for _ in $(seq 60); do sleep 1; kill -0 "$make_pid" 2>/dev/null || break; done
  kill -0 "$make_pid" 2>/dev/null && say "still compiling: $(grep -c '^  CC ' "$stage/build.log") files, $((SECONDS - start))s"
done
wait "$make_pid" || { grep -E 'error|Error' "$stage/build.log" | head -n 20 >&2; die "the kernel build failed"; }

# The harness trusts a kernel only after it has booted here: one boot, one command, a clean power-off.
mkdir -p "$stage/boot"
cat >"$stage/boot/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc && uname -r >"$(dirname "$0")/ok"
poweroff -f
EOF
chmod 755 "$stage/boot/init"
timeout -k 5 120 "$src/linux" mem=256M root=/dev/root rootfstype=hostfs rootflags=/ rw \
  init="$stage/boot/init" con=null con0=null,fd:1 quiet </dev/null >"$stage/boot/console" 2>&1 || true
[ -s "$stage/boot/ok" ] || { tail -n 20 "$stage/boot/console" >&2; die "the new kernel did not boot on this host"; }

mkdir -p "$stage/out"
install -m 0755 "$src/linux" "$stage/out/linux"
cp "$src/.config" "$stage/out/config"
cp "$stage/build.log" "$stage/out/build.log"
echo "$package $version $(cat "$stage/boot/ok") built $(date -u +%FT%TZ) in $((SECONDS - start))s" >"$stage/out/version"
rm -rf "$root"
mv "$stage/out" "$root"
say "built $(cat "$root/version") -> $kernel"
echo "$kernel"
