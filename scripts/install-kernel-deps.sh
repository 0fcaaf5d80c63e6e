#!/usr/bin/env bash
# Installs, on Debian/Ubuntu, what the project's user-mode-linux kernel needs: the tools that build it
# (scripts/uml-kernel.sh: gcc, make, flex, bison, bc, patch, xz) and the programs the tests run inside it
# (ip, tcpdump, ping). Idempotent: does nothing when every tool is already there. Needs root (or sudo -n).
set -euo pipefail
packages=(gcc make libc6-dev flex bison bc patch xz-utils iproute2 tcpdump iputils-ping)
# succeeds when something is missing
missing() {
  for tool in gcc make flex bison bc patch xz ip tcpdump ping; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || return 0
  done
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
missing && { echo "install-kernel-deps: installed, but a tool is still missing" >&2; exit 1; }
echo "install-kernel-deps: installed ${packages[*]}"
