"""ztd vs the real istiod (pilot-discovery), side by side: both read one real kube-apiserver, both serve N
simulated ztunnel Delta xDS clients.

Set-up: etcd + kube-apiserver (tests/support/kube.py), Istio's CRDs, and bench/xds.py's synthetic mesh created
through the API (W pods in W/100 ambient namespaces, 10 Services and 2 AuthorizationPolicies per namespace,
100 Nodes; each pod's status written as Running + Ready with its IP, as a kubelet would). Then ztd
(`python -m xds_server.main --kubeconfig`) and pilot-discovery (built by `scripts/istio-tools.sh
pilot-discovery`) start on loopback, and one client process per server opens N Delta streams like ztunnels
(bench/xds.py's run_client and node).

Measured per server, the other server and its clients SIGSTOPped meanwhile so the two never share the 2 cores:
- start -> ready, and start -> a probe client gets the whole mesh; N clients' initial sync;
- interleaved rounds (ztd, istiod, ztd, ...): one pod relabelled through the API server (both see it; the
  paused one catches up after), change -> each client received it (from the PATCH's return to the response
  holding the new label value); server CPU (utime+stime) from the patch until every client has it plus a
  settle, minus the idle rate of an equal window just before;
- RSS after the initial sync and after the changes.

    .venv/bin/python bench/vs_istiod.py                          # 5,000 pods x 200 clients, 20 changes each
    .venv/bin/python bench/vs_istiod.py --workloads 1000 --clients 50 --changes 5
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import http.client
import importlib.util
import json
import os
import queue
import re
import resource
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ would come first on sys.path and bench/xds.py would shadow xds-protos' `xds` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))


def _load_bench_xds() -> Any:
    spec = importlib.util.spec_from_file_location("bench_xds", ROOT / "bench" / "xds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_xds"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


X = _load_bench_xds()

ISTIO_TOOLS = ROOT / "scripts" / "istio-tools.sh"
PROBE_INDEX = 60000  # node_for(i) needs i < 65536; far above any client index
IMAGE = "registry.invalid/app:1"


class BenchError(Exception):
    """One readable line for the user."""


# -- tools ----------------------------------------------------------------------------------------------------


def pilot_discovery() -> Path:
    """The pinned pilot-discovery, built (minutes when cold) if missing."""
    if shutil.which("bash") is None:
        raise BenchError("bash is needed to run scripts/istio-tools.sh")
    located = subprocess.run(["bash", str(ISTIO_TOOLS), "--bin-dir"], capture_output=True, text=True, check=False)
    if located.returncode != 0:
        raise BenchError(f"scripts/istio-tools.sh --bin-dir failed: {located.stderr.strip()}")
    binary = Path(located.stdout.strip()) / "pilot-discovery"
    if not os.access(binary, os.X_OK):
        say(f"building pilot-discovery ({binary}); minutes when the Go cache is cold")
        built = subprocess.run(
            ["bash", str(ISTIO_TOOLS), "pilot-discovery"], capture_output=True, text=True, check=False, timeout=3600
        )
        if built.returncode != 0 or not os.access(binary, os.X_OK):
            last = (built.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"scripts/istio-tools.sh pilot-discovery failed (exit {built.returncode}): {last}")
    return binary


def istio_crds() -> tuple[list[dict[str, Any]], str]:
    """Istio's own CRDs (crd-all.gen.yaml of the pinned module, from the Go module cache), else ztd's subset."""
    import yaml

    pin = re.search(r'^ISTIO_PIN="([^"]+)"', ISTIO_TOOLS.read_text(), re.MULTILINE)
    source = ROOT / "manifests" / "crds" / "security-istio-io.yaml"
    if pin and shutil.which("go"):
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError):
            out = subprocess.run(
                ["go", "mod", "download", "-json", f"istio.io/istio@{pin.group(1)}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
                cwd=tempfile.gettempdir(),  # outside any module
            )
            crds = Path(json.loads(out.stdout)["Dir"]) / "manifests/charts/base/files/crd-all.gen.yaml"
            if crds.is_file():
                source = crds
    docs = [d for d in yaml.safe_load_all(source.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
    return docs, str(source)


# -- the API server, as admin, from many threads ---------------------------------------------------------------


class Rest:
    """JSON over one keep-alive HTTPS connection per thread: creating 10,000 pods one TLS handshake each is slow."""

    def __init__(self, cluster: Any) -> None:
        self.host, self.port = "127.0.0.1", cluster.apiserver_port
        self.ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
        self.ctx.load_cert_chain(str(cluster.pki.admin_cert), str(cluster.pki.admin_key))
        self.local = threading.local()

    def call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "Content-Type": content_type}
        for attempt in range(3):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
            try:
                conn.request(method, path, data, headers)
                resp = conn.getresponse()
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else {})
            except (http.client.HTTPException, OSError) as err:
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise BenchError(f"{method} {path}: {type(err).__name__}: {err}") from None
        raise AssertionError("unreachable")

    def ok(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        """The call, which must succeed (409 AlreadyExists counts as success for a create)."""
        status, out = self.call(method, path, body, content_type)
        if status >= 300 and not (status == 409 and method == "POST"):
            raise BenchError(f"{method} {path}: HTTP {status}: {out.get('message', out)}")
        return out


def create_mesh(rest: Rest, workloads: int, crds: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """bench/xds.py's synthetic mesh through the API, plus what a real cluster would have made of it."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = [d for d in yaml.load_all(X.synthetic_yaml(workloads), Loader=loader) if d]
    started = time.monotonic()
    for crd in crds:
        rest.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    deadline = time.monotonic() + 60
    for crd in crds:
        name = crd["metadata"]["name"]
        while True:
            got = rest.ok("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            if any(
                c["type"] == "Established" and c["status"] == "True"
                for c in got.get("status", {}).get("conditions", [])
            ):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"CRD {name} not established after 60s")
            time.sleep(0.1)

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    namespaces = [d["metadata"]["name"] for d in by_kind["Namespace"]]
    accounts = sorted({d["spec"]["serviceAccountName"] for d in by_kind["Pod"]})

    def namespace_or_node(doc: dict[str, Any]) -> None:
        rest.ok("POST", "/api/v1/namespaces" if doc["kind"] == "Namespace" else "/api/v1/nodes", doc)

    def account(ns_sa: tuple[str, str]) -> None:
        # The ServiceAccount admission plugin refuses a pod whose account does not exist.
        rest.ok("POST", f"/api/v1/namespaces/{ns_sa[0]}/serviceaccounts", {"metadata": {"name": ns_sa[1]}})

    def obj(doc: dict[str, Any]) -> None:
        ns = doc["metadata"]["namespace"]
        if doc["kind"] == "Service":
            doc["spec"].pop("clusterIP", None)  # outside the API server's range: let it allocate one
            rest.ok("POST", f"/api/v1/namespaces/{ns}/services", doc)
        elif doc["kind"] == "AuthorizationPolicy":
            rest.ok("POST", f"/apis/security.istio.io/v1/namespaces/{ns}/authorizationpolicies", doc)
        else:
            ip = doc.pop("status")["podIP"]
            doc["spec"]["automountServiceAccountToken"] = False
            # What istio-cni writes once it captured the pod: istiod sends HBONE only with it (ztd infers it
            # from the namespace label without it).
            doc["metadata"]["annotations"] = {"ambient.istio.io/redirection": "enabled"}
            for c in doc["spec"]["containers"]:
                c["image"] = IMAGE
            name = doc["metadata"]["name"]
            rest.ok("POST", f"/api/v1/namespaces/{ns}/pods", doc)
            # No kubelet: write what it would. istiod's ambient index skips pods without an IP and marks
            # pods without Ready unhealthy.
            status = {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            }
            rest.ok(
                "PATCH",
                f"/api/v1/namespaces/{ns}/pods/{name}/status",
                {"status": status},
                "application/merge-patch+json",
            )

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                namespace_or_node,
                [{"metadata": {"name": "istio-system"}, "kind": "Namespace"}, *by_kind["Namespace"], *by_kind["Node"]],
            )
        )
        list(pool.map(account, [(ns, sa) for ns in namespaces for sa in accounts]))
        rest_docs = [*by_kind["Service"], *by_kind["AuthorizationPolicy"], *by_kind["Pod"]]
        list(pool.map(obj, rest_docs, chunksize=16))
    return {
        "seconds": round(time.monotonic() - started, 1),
        "pods": [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in by_kind["Pod"]],
        "namespaces": len(namespaces),
        "services": len(by_kind["Service"]),
        "policies": len(by_kind["AuthorizationPolicy"]),
    }


# -- processes ----------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sched_seconds(pid: int) -> float:
    """Time on CPU summed over the live threads (/proc/PID/task/*/schedstat, ns): the 10 ms ticks of
    utime+stime are as coarse as one istiod change. A thread that exits takes its time along."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def cpu_now(pid: int) -> tuple[float, float]:
    return cpu_seconds(pid), sched_seconds(pid)


def rss_mib(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")}
    return round(values.get("VmRSS", 0) / 1024, 1), round(values.get("VmHWM", 0) / 1024, 1)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    piped: bool = False  # a client process: JSON lines on stdin/stdout
    owned: bool = True  # False: someone else stops it
    proc: subprocess.Popen[str] | None = None
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    started: float = 0.0

    def start(self) -> Proc:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if self.piped else subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.piped else log,
                stderr=log,
                env=self.env,
                cwd=ROOT,
                text=True,
                bufsize=1,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop them in order
            )
        self.started = time.monotonic()
        if self.piped:
            threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def died(self) -> str:
        """'' while running, else one line saying how it ended."""
        if self.proc is None or self.proc.poll() is None:
            return ""
        tail = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["(empty)"]
        return f"{self.name} exited with code {self.proc.returncode} (log {self.log}; last line: {tail[0][:300]})"

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a stopped process would not see SIGTERM until continued
        if self.piped and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
        else:
            self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def ask(self, cmd: dict[str, Any], timeout: float, watch: list[Proc]) -> dict[str, Any]:
        """Send one command to a client process and wait for its reply, failing fast if anything died."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise BenchError(self.died() or f"{self.name}: cannot write its stdin") from None
        deadline = time.monotonic() + timeout
        while True:
            check_alive(watch)
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: no answer to {cmd['cmd']} within {timeout:.0f}s") from None
                continue
            if line is None:
                raise BenchError(self.died() or f"{self.name} closed its stdout")
            return dict(json.loads(line))


def check_alive(procs: list[Proc]) -> None:
    for p in procs:
        if msg := p.died():
            raise BenchError(msg)


def wait_http(url: str, proc: Proc, watch: list[Proc], timeout: float) -> float:
    """Seconds from the process start until url answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive(watch)
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as resp,  # noqa: S310 - loopback
        ):
            if resp.status == 200:
                return time.monotonic() - proc.started
        time.sleep(0.1)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout:.0f}s (log {proc.log})")


# -- the client process -----------------------------------------------------------------------------------------


class Recorder:
    """A per-client response deserializer for run_client that notes when the armed label value first arrives.

    The token is the relabelled pod's new `version` label, which both servers carry into the Workload
    (canonical revision): finding its bytes in a response proves the change itself arrived, not just any push.
    """

    def __init__(self, lite: Any, armed: list[bytes]) -> None:
        self.lite, self.armed, self.seen = lite, armed, 0.0

    def FromString(self, data: bytes) -> Any:  # protobuf's name: run_client calls it
        if self.armed[0] and not self.seen and self.armed[0] in data:
            self.seen = time.time()
        return self.lite.FromString(data)


class Capture:
    """The probe's deserializer: keeps the first response of each type whole, for comparing the two servers."""

    def __init__(self, lite: Any) -> None:
        self.lite, self.first = lite, dict[str, bytes]()

    def FromString(self, data: bytes) -> Any:
        msg = self.lite.FromString(data)
        self.first.setdefault(msg.type_url, data)
        return msg


async def clients_main(port: int, count: int) -> None:
    gc.disable()  # the clients are the measuring instrument: no collector pauses in their timings
    lite = X.lite_response_class()
    armed = [b""]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients: list[Any] = []
    recorders: list[Recorder] = []
    calls: list[Any] = []
    tasks: list[asyncio.Task[None]] = []

    def reply(**out: Any) -> None:
        print(json.dumps(out), flush=True)

    async def one_shot(index: int, capture: Capture) -> Any:
        client = X.Client(index, True)
        done, probe_calls = asyncio.Event(), []
        task = asyncio.create_task(X.run_client(client, port, capture, done, [0, 1], probe_calls))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        for call in probe_calls:
            call.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return client

    while line := (await reader.readline()).decode().strip():
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "probe":
            # Until the server hands a new client the whole mesh (ready != loaded for every server).
            start, n, client = time.monotonic(), 0, None
            while time.monotonic() - start < msg["timeout"]:
                capture = Capture(lite)
                client = await one_shot(PROBE_INDEX + n % 1000, capture)
                n += 1
                got = (client.counts.get(X.ADDRESS, 0), client.counts.get(X.AUTHORIZATION, 0))
                if got[0] >= msg["address"] and got[1] >= msg["authorization"]:
                    break
                await asyncio.sleep(0.5)
            assert client is not None
            for type_url, data in capture.first.items():
                with open(f"{msg['dump']}-{type_url.rsplit('.', 1)[-1]}.pb", "wb") as f:  # noqa: ASYNC230 - once
                    f.write(data)
            reply(
                address=client.counts.get(X.ADDRESS, 0),
                authorization=client.counts.get(X.AUTHORIZATION, 0),
                verified=client.verified,
                error=client.error,
                tries=n,
            )
        elif cmd == "connect":
            clients = [X.Client(i, i == 0) for i in range(count)]
            recorders = [Recorder(lite, armed) for _ in clients]
            synced = asyncio.Event()
            total = [0, count]
            start = time.time()
            tasks = [
                asyncio.create_task(X.run_client(c, port, r, synced, total, calls))
                for c, r in zip(clients, recorders, strict=True)
            ]
            try:
                await asyncio.wait_for(synced.wait(), msg["timeout"])
            except TimeoutError:
                reply(error=f"{count - total[0]} of {count} clients not synced after {msg['timeout']}s")
                continue
            per_client = [c.synced_at - c.connected_at for c in clients if c.synced_at]
            reply(
                all_seconds=round(max(c.synced_at for c in clients) - start, 3),
                per_client_p50_seconds=round(X.pct(per_client, 50), 3),
                per_client_p99_seconds=round(X.pct(per_client, 99), 3),
                errors=sorted({c.error for c in clients if c.error})[:5],
                error_count=sum(1 for c in clients if c.error),
                address_counts=sorted({c.counts.get(X.ADDRESS, -1) for c in clients}),
                authorization_counts=sorted({c.counts.get(X.AUTHORIZATION, -1) for c in clients}),
                verified=clients[0].verified,
            )
            gc.collect()
            gc.freeze()
        elif cmd == "arm":
            armed[0] = msg["token"].encode()
            for r in recorders:
                r.seen = 0.0
            reply(armed=msg["token"])
        elif cmd == "wait":
            deadline = time.monotonic() + msg["timeout"]
            # Polling finds the end; each client's own time was taken when its response arrived.
            while not all(r.seen for r in recorders) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            reply(times=[r.seen or None for r in recorders])
        elif cmd == "rss":
            reply(rss=rss_mib(os.getpid()))
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the two servers ---------------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    server: Proc
    ready_url: str
    xds_port: int
    clients: Proc | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # utime+stime per change, 10 ms ticks
    cpu_sched: list[float] = field(default_factory=list)  # the same from schedstat, ns
    round_p99: list[float] = field(default_factory=list)
    missed: int = 0
    catchup_missed: int = 0
    last_window: float = 1.5

    def pause(self) -> None:
        for p in (self.server, self.clients):
            if p is not None:
                p.signal(signal.SIGSTOP)

    def resume(self) -> None:
        for p in (self.server, self.clients):
            if p is not None:
                p.signal(signal.SIGCONT)


ISTIOD_ENV = {
    # ztunnel clients are refused without it, and the ambient index (the Address/Authorization source) is off
    "PILOT_ENABLE_AMBIENT": "true",
    # No CA, no istiod serving certificate: there is no 15012 port here, and ztd's CA is not measured either.
    "ENABLE_CA_SERVER": "false",
    "PILOT_CERT_PROVIDER": "none",
    # istiod otherwise admits 25 new streams/s (2 cores), burst 1, and fails the rest after 1s with
    # ResourceExhausted (real ztunnels retry with backoff); the clients here connect all at once and do not retry.
    "PILOT_MAX_REQUESTS_PER_SECOND": "100000",
    # No webhook configurations exist to patch; the injector is off anyway without its ConfigMap.
    "VALIDATION_WEBHOOK_CONFIG_NAME": "",
    "INJECTION_WEBHOOK_CONFIG_NAME": "",
    "POD_NAMESPACE": "istio-system",
    "POD_NAME": "istiod-bench",
    "REVISION": "default",
}

MESH_CONFIG = """\
rootNamespace: istio-system
trustDomain: cluster.local
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
"""


def start_ztd(work: Path, kubeconfig: Path) -> Side:
    from tests.support.kube import free_port

    xds, secure, monitoring = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "xds_server.main", "--kubeconfig", str(kubeconfig), "--state-dir",
            str(work / "ztd-state"), "--xds-port", str(xds), "--secure-port", str(secure),
            "--monitoring-port", str(monitoring)]  # fmt: skip
    proc = Proc("ztd", argv, work / "ztd.log").start()
    return Side("ztd", proc, f"http://127.0.0.1:{monitoring}/ready", xds)


def start_istiod(work: Path, binary: Path, kubeconfig: Path) -> Side:
    from tests.support.kube import free_port

    grpc_port, http_port, monitoring, ctrlz = free_port(), free_port(), free_port(), free_port()
    (work / "mesh.yaml").write_text(MESH_CONFIG)
    (work / "meshNetworks.yaml").write_text("networks: {}\n")
    argv = [
        str(binary),
        "discovery",
        f"--kubeconfig={kubeconfig}",
        f"--meshConfig={work / 'mesh.yaml'}",
        f"--networksConfig={work / 'meshNetworks.yaml'}",
        f"--grpcAddr=127.0.0.1:{grpc_port}",  # plaintext xDS, 15010 in a cluster: no client authentication
        f"--httpAddr=127.0.0.1:{http_port}",  # /ready, debug; webhooks multiplexed here (no --httpsAddr)
        "--httpsAddr=",
        "--secureGRPCAddr=",  # 15012 needs the istiod certificate the CA would sign
        f"--monitoringAddr=127.0.0.1:{monitoring}",
        f"--ctrlz_port={ctrlz}",
        "--shutdownDuration=1s",
        "--domain=cluster.local",
    ]
    env = {**os.environ, **ISTIOD_ENV}
    proc = Proc("istiod", argv, work / "istiod.log", env=env).start()
    return Side("istiod", proc, f"http://127.0.0.1:{http_port}/ready", grpc_port)


def start_clients(side: Side, work: Path, count: int) -> Proc:
    argv = [sys.executable, str(Path(__file__).resolve()), "--clients-proc", "--port", str(side.xds_port),
            "--clients", str(count)]  # fmt: skip
    side.clients = Proc(f"{side.name} clients", argv, work / f"clients-{side.name}.log", piped=True).start()
    return side.clients


# -- what the two servers sent --------------------------------------------------------------------------------------


def _resources(path: Path, cls: Any) -> dict[str, Any]:
    from envoy.service.discovery.v3 import discovery_pb2

    out = {}
    if path.is_file():
        for r in discovery_pb2.DeltaDiscoveryResponse.FromString(path.read_bytes()).resources:
            msg = cls()
            r.resource.Unpack(msg)
            out[r.name] = msg
    return out


def _field_diffs(a: Any, b: Any, prefix: str, into: dict[str, int], example: dict[str, str]) -> None:
    """Names of the (sub)fields that differ; repeated fields compared as multisets (order is not meaning)."""
    for fd in a.DESCRIPTOR.fields:
        name = prefix + fd.name
        va, vb = getattr(a, fd.name), getattr(b, fd.name)
        if fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            same = dict(va) == dict(vb)
        elif fd.is_repeated and fd.message_type is None:
            same = sorted(map(str, va)) == sorted(map(str, vb))
        elif fd.is_repeated:
            same = sorted(m.SerializeToString(deterministic=True) for m in va) == sorted(
                m.SerializeToString(deterministic=True) for m in vb
            )
        elif fd.message_type is not None:
            if a.HasField(fd.name) and b.HasField(fd.name):
                _field_diffs(va, vb, name + ".", into, example)
                continue
            same = a.HasField(fd.name) == b.HasField(fd.name)
        else:
            same = va == vb
        if not same:
            into[name] = into.get(name, 0) + 1
            example.setdefault(name, f"ztd={_short(va)} istiod={_short(vb)}")


def _short(value: Any) -> str:
    text = str(list(value) if hasattr(value, "__len__") and not isinstance(value, str | bytes) else value)
    return " ".join(text.split())[:160]


def compare_resources(work: Path) -> dict[str, Any]:
    """Resource by resource, what ztd sent a new client against what istiod sent it."""
    from protos.istio.security import authorization_pb2
    from protos.istio.workload import workload_pb2

    report: dict[str, Any] = {}
    for kind, cls in (("Address", workload_pb2.Address), ("Authorization", authorization_pb2.Authorization)):
        ours = _resources(work / f"probe-ztd-{kind}.pb", cls)
        theirs = _resources(work / f"probe-istiod-{kind}.pb", cls)
        diffs: dict[str, int] = {}
        example: dict[str, str] = {}
        unknown = 0
        for name in ours.keys() & theirs.keys():
            b = theirs[name]
            unknown += b.ByteSize() != _known_size(b)  # fields newer than ztd's copy of the proto
            _field_diffs(ours[name], b, "", diffs, example)
        report[kind] = {
            "ztd": len(ours),
            "istiod": len(theirs),
            "only_ztd": sorted(ours.keys() - theirs.keys())[:5],
            "only_istiod": sorted(theirs.keys() - ours.keys())[:5],
            "only_ztd_count": len(ours.keys() - theirs.keys()),
            "only_istiod_count": len(theirs.keys() - ours.keys()),
            "fields_differing": dict(sorted(diffs.items())),
            "examples": example,
            "istiod_fields_unknown_to_ztd_proto": unknown,
        }
    return report


def _known_size(msg: Any) -> int:
    copy = msg.__class__()
    copy.CopyFrom(msg)
    copy.DiscardUnknownFields()
    return int(copy.ByteSize())


# -- the measurement ------------------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def say(*words: object) -> None:
    print("vs_istiod:", *words, file=sys.stderr, flush=True)


def one_line(err: Exception, limit: int = 400) -> str:
    return " ".join(str(err).split())[:limit]


def bench(args: argparse.Namespace, work: Path, procs: list[Proc], tools: Any) -> dict[str, Any]:
    from tests.support.kube import KubeCluster, KubeToolsError

    binary = pilot_discovery()
    crds, crd_source = istio_crds()
    say("starting etcd + kube-apiserver")
    try:
        cluster = KubeCluster.start(tools, work / "kube")
    except KubeToolsError as err:
        raise BenchError(one_line(err)) from None
    # Watched for dying like the servers, stopped by cluster.stop().
    for name, popen in (("etcd", cluster.etcd), ("kube-apiserver", cluster.apiserver)):
        watched = Proc(name, [], work / "kube" / f"{name.removeprefix('kube-')}.log", owned=False)
        watched.proc = popen
        procs.append(watched)
    try:
        return measure(args, work, procs, cluster, binary, crds, crd_source)
    finally:
        for p in reversed(procs):  # the servers before the API server they watch
            if p.owned:
                p.stop()
        cluster.stop()


def measure(
    args: argparse.Namespace,
    work: Path,
    procs: list[Proc],
    cluster: Any,
    binary: Path,
    crds: list[dict[str, Any]],
    crd_source: str,
) -> dict[str, Any]:
    rest = Rest(cluster)
    say(f"creating {args.workloads} pods through the API server")
    mesh = create_mesh(rest, args.workloads, crds, args.threads)
    say(f"mesh created in {mesh['seconds']}s")
    # Workloads + Services; the API server's own `kubernetes` Service in default may come on top.
    want_address = args.workloads + mesh["services"]
    want_auth = mesh["policies"]
    result: dict[str, Any] = {
        "workloads": args.workloads,
        "clients": args.clients,
        "changes_per_server": args.changes,
        "namespaces": mesh["namespaces"],
        "expected_address_resources_at_least": want_address,
        "expected_authorization_resources": want_auth,
        "mesh_create_seconds": mesh["seconds"],
        "crds": crd_source,
        "cpus": os.cpu_count(),
    }

    sides: list[Side] = []
    for starter in ("ztd", "istiod"):
        for other in sides:
            other.pause()  # the other one idles stopped while this one loads
        side = (
            start_ztd(work, cluster.kubeconfig) if starter == "ztd" else start_istiod(work, binary, cluster.kubeconfig)
        )
        procs.append(side.server)
        sides.append(side)
        procs.append(start_clients(side, work, args.clients))
        say(f"{side.name}: waiting for ready, then for a probe client to get the whole mesh")
        side.figures["start_to_ready_seconds"] = round(wait_http(side.ready_url, side.server, procs, 300), 2)
        assert side.clients is not None
        probe = side.clients.ask(
            {
                "cmd": "probe",
                "address": want_address,
                "authorization": want_auth,
                "timeout": args.sync_timeout,
                "dump": str(work / f"probe-{side.name}"),
            },
            args.sync_timeout + 120,
            procs,
        )
        side.figures["start_to_full_mesh_seconds"] = round(time.monotonic() - side.server.started, 2)
        side.figures["probe"] = probe
        if probe["address"] < want_address or probe["authorization"] < want_auth:
            say(f"{side.name}: probe got {probe} (wanted {want_address}/{want_auth}); going on")
        side.figures["rss_loaded_no_clients_mib"] = rss_mib(side.server.pid)[0]
    for side in sides:
        side.pause()
    result["resources_compared"] = compare_resources(work)

    ztd, istiod = sides
    for side, other in ((ztd, istiod), (istiod, ztd)):
        other.pause()
        side.resume()
        assert side.clients is not None
        say(f"{side.name}: connecting {args.clients} clients")
        synced = side.clients.ask({"cmd": "connect", "timeout": args.sync_timeout}, args.sync_timeout + 60, procs)
        if "error" in synced:
            raise BenchError(f"{side.name}: {synced['error']}")
        side.figures["initial_sync"] = synced
        time.sleep(1.0)
        side.figures["rss_after_sync_mib"] = rss_mib(side.server.pid)[0]
    ztd.resume()
    istiod.resume()
    time.sleep(1.0)

    pods = mesh["pods"]
    for n in range(args.changes * 2):
        side, other = (ztd, istiod) if n % 2 == 0 else (istiod, ztd)
        ns, pod = pods[(n * 7919) % len(pods)]
        token = f"bench-{n:03d}-{side.name}-{secrets.token_hex(3)}"
        for s in (side, other):
            assert s.clients is not None
            s.clients.ask({"cmd": "arm", "token": token}, 30, procs)
        other.pause()
        try:
            pid = side.server.pid
            idle_for = min(max(side.last_window, 1.0), 5.0)
            c0 = cpu_now(pid)
            time.sleep(idle_for)
            idle_rate = [(b - a) / idle_for for a, b in zip(c0, cpu_now(pid), strict=True)]
            cpu_start, t_start = cpu_now(pid), time.time()
            rest.ok(
                "PATCH",
                f"/api/v1/namespaces/{ns}/pods/{pod}",
                {"metadata": {"labels": {"version": token}}},
                "application/merge-patch+json",
            )
            patched = time.time()
            assert side.clients is not None
            got = side.clients.ask({"cmd": "wait", "timeout": args.change_timeout}, args.change_timeout + 30, procs)
            time.sleep(args.settle)
            window = time.time() - t_start
            used = [b - a - r * window for a, b, r in zip(cpu_start, cpu_now(pid), idle_rate, strict=True)]
            side.cpu.append(used[0])
            side.cpu_sched.append(used[1])
            side.last_window = window
            times = [t for t in got["times"] if t]
            side.missed += len(got["times"]) - len(times)
            lat = [t - patched for t in times]
            side.latencies += lat
            side.round_p99.append(ms(X.pct(lat, 99)) if lat else -1)
            say(
                f"change {n} on {side.name}: p99 {side.round_p99[-1]} ms, "
                f"cpu {ms(side.cpu[-1])} ms (schedstat {ms(side.cpu_sched[-1])} ms)"
            )
        finally:
            other.resume()
        # The paused one now sees the same relabel: let it finish before the next round measures anything.
        assert other.clients is not None
        caught = other.clients.ask({"cmd": "wait", "timeout": 120}, 150, procs)
        other.catchup_missed += sum(1 for t in caught["times"] if not t)
        time.sleep(args.settle)

    for side in sides:
        f = side.figures
        f["rss_after_changes_mib"], f["rss_peak_mib"] = rss_mib(side.server.pid)
        if side.latencies:
            f["change_to_client_p50_ms"] = ms(X.pct(side.latencies, 50))
            f["change_to_client_p99_ms"] = ms(X.pct(side.latencies, 99))
            f["change_to_client_max_ms"] = ms(max(side.latencies))
        f["change_samples"] = len(side.latencies)
        f["change_missed"] = side.missed
        f["catchup_missed"] = side.catchup_missed
        f["per_change_p99_ms"] = side.round_p99
        for key, values in (("cpu_per_change_ms", side.cpu), ("cpu_per_change_schedstat_ms", side.cpu_sched)):
            if values:
                f[key] = {
                    "min": ms(min(values)),
                    "median": ms(statistics.median(values)),
                    "mean": ms(statistics.mean(values)),
                    "max": ms(max(values)),
                }
        init = f["initial_sync"]
        f["address_resources"] = init["address_counts"]
        f["authorization_resources"] = init["authorization_counts"]
        result[side.name] = f

    ratios: dict[str, float | None] = {}

    def ratio(key: str, a: Any, b: Any) -> None:
        ratios[key] = round(a / b, 2) if a is not None and b else None

    zf, sf = ztd.figures, istiod.figures
    ratio("start_to_full_mesh", zf["start_to_full_mesh_seconds"], sf["start_to_full_mesh_seconds"])
    ratio("initial_sync_all", zf["initial_sync"]["all_seconds"], sf["initial_sync"]["all_seconds"])
    for key in ("change_to_client_p50_ms", "change_to_client_p99_ms", "change_to_client_max_ms"):
        ratio(key.removesuffix("_ms"), zf.get(key), sf.get(key))
    if ztd.cpu and istiod.cpu:
        ratio("cpu_per_change_median", statistics.median(ztd.cpu), statistics.median(istiod.cpu))
        ratio("cpu_per_change_mean", statistics.mean(ztd.cpu), statistics.mean(istiod.cpu))
        ratio("cpu_per_change_schedstat_median", statistics.median(ztd.cpu_sched), statistics.median(istiod.cpu_sched))
    for key in ("rss_after_sync_mib", "rss_after_changes_mib", "rss_peak_mib"):
        ratio(key.removesuffix("_mib"), zf[key], sf[key])
    result["ratios_ztd_over_istiod"] = ratios
    result["istiod_env"] = ISTIOD_ENV
    result["istiod_args"] = istiod.server.argv[1:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--changes", type=int, default=20, help="changes per server")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after the last client got a change")
    parser.add_argument("--change-timeout", type=float, default=60)
    parser.add_argument("--sync-timeout", type=float, default=600)
    parser.add_argument("--threads", type=int, default=16, help="concurrent API calls while creating the mesh")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here (default: a temporary folder)")
    parser.add_argument("--clients-proc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Inherited by ztd and the client processes: a stream per client, both ends.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 1024)), hard))
    if args.clients_proc:
        asyncio.run(clients_main(args.port, args.clients))
        return 0

    from tests.support.kube import KubeToolsError, kube_tools

    try:  # the tools first: a missing one fails before anything starts
        tools = kube_tools()
        pilot_discovery()
    except KubeToolsError as err:
        print(f"vs_istiod: error: {one_line(err)}", file=sys.stderr)
        return 1
    except BenchError as err:
        print(f"vs_istiod: error: {err}", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ztdpu-vs-istiod-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    failed = True
    try:
        result = bench(args, work, procs, tools)
        failed = False
    except BenchError as err:
        print(f"vs_istiod: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vs_istiod: interrupted", file=sys.stderr)
        return 130
    finally:
        for p in reversed(procs):
            if p.owned:
                p.stop()
        if failed:
            say(f"logs kept in {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
