#!/usr/bin/env bash
# Installs what the kernel tests (tests/kernel/) need on Debian/Ubuntu: user-mode-linux (a real Linux 6.1
# kernel as a process, with esp4/xfrm_user/veth modules), modprobe, ip, tcpdump and ping.
# Idempotent: does nothing when every tool is already there. Needs root (or passwordless sudo).
set -euo pipefail
packages=(user-mode-linux kmod iproute2 tcpdump iputils-ping)
# succeeds when something is missing
missing() {
  for tool in linux.uml modprobe ip tcpdump ping; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || return 0
  done
  [ -d /usr/lib/uml/modules ] || return 0
  return 1
}
if ! missing; then
  echo "install-kernel-deps: already installed"
  exit 0
fi
command -v apt-get >/dev/null || { echo "install-kernel-deps: apt-get not found; install ${packages[*]} by hand" >&2; exit 1; }
sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-kernel-deps: run as root (needs apt-get install ${packages[*]})" >&2; exit 1; }
  sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
missing && { echo "install-kernel-deps: installed, but linux.uml or a tool is still missing" >&2; exit 1; }
echo "install-kernel-deps: installed ${packages[*]}"
