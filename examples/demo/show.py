"""The demo, step by step: pods' SPIFFE identities become per-pod-pair ESP tunnels, policy decides which pairs
get one, and the data plane shows it. Run by scripts/run-demo.sh (`--once` plays it and exits).

ztd runs here, on 127.0.0.1, serving examples/mesh (copied to <state>/mesh with the zt-bridge pods and two
sidecar pods of examples/demo/). Two nodes (network namespaces joined by a veth underlay, a namespace per pod)
each run a zt-bridge: in this host's kernel when it has ESP with AES-GCM, otherwise inside the project's own
Linux kernel (user-mode-linux, tools/uml-kernel/), linked to this host by a veth pair. A pair of Envoy
sidecars with zt-agent makes one mTLS request. Every number printed is read from the running system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from stage import (
    ADMIN_PORTS,
    GUEST_ADDRESS,
    HOST_ADDRESS,
    LAB_PORT,
    REPO,
    Agent,
    DemoError,
    Envoy,
    Lab,
    Ztd,
    ensure_kernel,
    host_has_esp,
    http_json,
    make_link,
    relay,
    remove_link,
    wait_for,
)

HERE = Path(__file__).resolve().parent
MESH_CIDR = "10.244.0.0/16"
NODES = {
    "node-a": {"address": "10.10.0.1", "gateway": "10.244.1.1", "peers": {"10.244.2.0/24": "node-b"}},
    "node-b": {"address": "10.10.0.2", "gateway": "10.244.2.1", "peers": {"10.244.1.0/24": "node-a"}},
}
# the pairs the story uses (all from examples/mesh)
TALK = ("shop/frontend-1", "10.244.2.10", "shop/frontend-2")  # frontend-allow-all: admitted both ways
DENIED = ("payments/ledger-1", "10.244.2.20", "payments/ledger-2")  # ledger-allow-cart admits only shop/cart
REKEY = ("shop/cart-1", "10.244.2.20", "payments/ledger-2", "10.244.1.11")  # ledger-allow-cart
ZTUNNEL_PODS = "10-ztunnel.yaml"
REVOKE_FILE = "45-demo-revoke-frontend.yaml"
REVOKE = """# Written by the demo (step 4): shop's frontends may no longer talk to each other.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: demo-revoke-frontend
  namespace: shop
spec:
  selector:
    matchLabels:
      app: frontend
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/frontend"]
"""


class Show:
    def __init__(self, args: argparse.Namespace) -> None:
        self.once: bool = args.once
        self.state: Path = args.state_dir.resolve()
        self.kernel_choice: str = args.kernel
        self.mesh = self.state / "mesh"
        self.t0 = time.monotonic()
        self.env = {**os.environ, "ZTD_STATE_DIR": str(self.state)}
        self.lab: Lab | None = None
        self.session: aiohttp.ClientSession | None = None

    # --- printing ------------------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def setup(self, text: str) -> None:
        self.say(f"[setup {time.monotonic() - self.t0:5.1f}s] {text}")

    def step(self, number: str, title: str) -> float:
        self.say()
        bar = f"── {number}. {title} "
        self.say(bar + "─" * max(3, 100 - len(bar)) + f" {time.monotonic() - self.t0:.1f}s")
        return time.monotonic()

    async def ztctl(self, *args: str, show: bool = True) -> str:
        """Run ztctl as a user would; print the command and what it printed. (A child process, awaited: the
        event loop also relays the guest's bridges to ztd and must not stop for it.)"""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ztctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.env, cwd=REPO,
        )  # fmt: skip
        out, err = await proc.communicate()
        if show:
            self.say(f"$ ztctl {' '.join(args)}")
            self.say(out.decode().rstrip())
        if proc.returncode != 0:
            raise DemoError(f"ztctl {' '.join(args)} failed: {err.decode().strip()}")
        return out.decode()

    async def token(self, node: str, name: str) -> Path:
        """A node-bound token of istio-system/ztunnel, in a file only its owner can read."""
        token = await self.ztctl("token", "create", "istio-system/ztunnel", "--node", node, "--duration", "24h",
                                 show=False)  # fmt: skip
        path = self.state / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token.strip())
        return path

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    async def lab_call(self, method: str, path: str, body: Any = None, seconds: float = 120) -> Any:
        assert self.lab is not None
        return await http_json(self.http, method, f"{self.lab.api}{path}", body, seconds)

    def bridge_flags(self) -> list[str]:
        assert self.lab is not None
        return [f for b in self.lab.bridges() for f in ("--bridge", b)]

    async def dumps(self) -> dict[str, dict[str, Any]]:
        assert self.lab is not None
        out = {}
        for node, port in ADMIN_PORTS.items():
            out[node] = await http_json(self.http, "GET", f"http://{self.lab.address}:{port}/config_dump", seconds=10)
        return out

    # --- the show ------------------------------------------------------------------------------------------

    async def run(self) -> int:
        if os.geteuid() != 0:
            raise DemoError("run as root (sudo scripts/run-demo.sh): nodes and pods are network namespaces, "
                            "tunnels are XFRM state")  # fmt: skip
        async with aiohttp.ClientSession() as self.session, contextlib.AsyncExitStack() as stack:
            await self.prepare(stack)
            await self.identities()
            await self.tunnels()
            await self.traffic()
            await self.revoke()
            await self.rekey()
            await self.sidecars(stack)
            self.next_steps()
            if not self.once:
                await self.until_interrupted()
            self.say(f"\nstopping (the demo ran {time.monotonic() - self.t0:.0f}s) ...")
        self.say("stopped: ztd, the nodes, zt-bridges, sidecars and zt-agent are gone; state stays in "
                 f"{self.state}")  # fmt: skip
        return 0

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        self.say("ztdpu demo: SPIFFE identities from an Istio-compatible CA become per-pod-pair IPsec tunnels")
        self.state.mkdir(parents=True, exist_ok=True)
        if self.mesh.exists():
            shutil.rmtree(self.mesh)
        # the zt-bridges stand in for ztunnel on the nodes: its pods stay out, the bridges' pods come in
        shutil.copytree(REPO / "examples" / "mesh", self.mesh, ignore=shutil.ignore_patterns(ZTUNNEL_PODS))
        for extra in ("11-zt-bridge-pods.yaml", "60-sidecar-pods.yaml"):
            shutil.copy(HERE / extra, self.mesh / extra)
        self.setup(f"mesh: examples/mesh with zt-bridge pods in ztunnel's place, and two sidecar pods -> {self.mesh}")

        ztd = Ztd(self.state, self.mesh)
        stack.push_async_callback(ztd.stop)
        await ztd.start(self.http)
        self.setup("ztd on 127.0.0.1: CA and xDS over TLS :15012, xDS :15010, metrics and /debug :15014 "
                   f"(log {ztd.log})")  # fmt: skip

        tokens = {node: await self.token(node, f"token-{node}") for node in NODES}

        uml_kernel = await self.choose_kernel()
        lab = Lab(address="127.0.0.1", xds="127.0.0.1:15012")
        if uml_kernel is not None:
            make_link()
            stack.callback(remove_link)
            lab = Lab(address=GUEST_ADDRESS, xds=f"{HOST_ADDRESS}:15012")
            lab.relay = await relay((HOST_ADDRESS, 15012), ("127.0.0.1", 15012))
        self.lab = lab
        stack.push_async_callback(lab.stop, self.http)
        cfg = {
            "listen": lab.address, "port": LAB_PORT, "mesh_cidr": MESH_CIDR, "log_dir": str(self.state),
            "python": sys.executable, "repo": str(REPO), "nodes": NODES, "pods": self.pods(),
            "uplink": {"dev": "vec0", "address": f"{GUEST_ADDRESS}/30"} if uml_kernel else None,
            "bridge": {"xds": lab.xds, "root_cert": str(self.state / "root-cert.pem"),
                       "tokens": {n: str(p) for n, p in tokens.items()}, "admin_address": lab.address,
                       "admin_ports": ADMIN_PORTS},
        }  # fmt: skip
        started = time.monotonic()
        await lab.start(cfg, self.state, uml_kernel)
        kernel = await lab.wait_ready(self.http, 300, self.setup)
        self.setup(f"nodes up in {time.monotonic() - started:.1f}s (Linux {kernel}): node-a 10.10.0.1 and node-b "
                   f"10.10.0.2 on one underlay, {len(cfg['pods'])} pods, a zt-bridge on each "
                   f"(logs {self.state}/zt-bridge-node-*.log)")  # fmt: skip

    async def choose_kernel(self) -> str | None:
        """None: this host's kernel carries the nodes; else the path of the UML kernel that will."""
        if self.kernel_choice != "uml":
            ok, why = host_has_esp()
            if ok:
                self.setup(f"kernel: this host's Linux {os.uname().release} has ESP with AES-GCM: the nodes run here")
                return None
            if self.kernel_choice == "host":
                raise DemoError(f"--kernel host: this kernel takes no AES-GCM ESP SA ({why})")
            self.setup(f"kernel: this host's Linux {os.uname().release} has no ESP with AES-GCM ({why}), so the "
                       "nodes run inside the project's own Linux 6.1 (user-mode-linux, tools/uml-kernel/)")  # fmt: skip
        return await asyncio.to_thread(ensure_kernel, lambda line: self.setup(f"kernel: {line}"))

    def pods(self) -> list[dict[str, str]]:
        """The mesh's pods that have a place in the nodes: pod network, an address in the mesh CIDR."""
        out = []
        for path in sorted(self.mesh.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc or doc.get("kind") != "Pod" or doc.get("spec", {}).get("hostNetwork"):
                    continue
                ip = str(doc.get("status", {}).get("podIP", ""))
                if ip.startswith("10.244.") and doc["spec"].get("nodeName") in NODES:
                    name = f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"
                    out.append({"name": name, "ip": ip, "node": doc["spec"]["nodeName"]})
        return out

    # 1
    async def identities(self) -> None:
        started = self.step("1", "Pods and their SPIFFE identities, as ztd serves them to node agents")
        await self.ztctl("ztunnel-config", "workloads")
        workloads = json.loads(await self.ztctl("ztunnel-config", "workloads", "-o", "json", show=False))
        self.say("\nthe identity each one's certificate will carry (from the same resources: spiffe://<trust domain>"
                 "/ns/<namespace>/sa/<service account>):")  # fmt: skip
        for w in workloads:
            trust = w.get("trustDomain") or "cluster.local"
            pod = f"{w['namespace']}/{w['name']}"
            self.say(f"  {pod:<30} spiffe://{trust}/ns/{w['namespace']}/sa/{w.get('serviceAccount') or 'default'}")
        self.say()
        await self.ztctl("ztunnel-config", "policies")
        self.say(f"(ztd answered in {time.monotonic() - started:.1f}s)")

    # 2
    async def tunnels(self) -> None:
        started = self.step("2", "Tunnels: one mTLS handshake per admitted pod pair, keys from its TLS exporter")

        async def settled() -> dict[str, dict[str, Any]] | None:
            dumps = await self.dumps()
            for dump in dumps.values():
                rows = dump["tunnels"]
                if dump["state_version"] in (None, 0) or not rows or any(r["state"] != "up" for r in rows):
                    return None
            return dumps

        dumps = await wait_for("every admitted tunnel up", settled, 120, every=0.5)
        await self.ztctl("tunnels", *self.bridge_flags(), "--node", "node-a")
        a = {(r["local_address"], r["peer_address"]): r for r in dumps["node-a"]["tunnels"]}
        b = {(r["peer_address"], r["local_address"]): r for r in dumps["node-b"]["tunnels"]}
        mirrored = [
            k for k, r in a.items() if k in b and (b[k]["spi_in"], b[k]["spi_out"]) == (r["spi_out"], r["spi_in"])
        ]
        refused = {frozenset((r["local_pod"], r["peer_pod"])) for d in dumps.values() for r in d["refused_pairs"]}
        self.say(f"\nnode-b holds the same tunnels from its side ({len(b)}; {len(mirrored)} of node-a's {len(a)} with "
                 "the SPIs mirrored: its inbound SPI is node-a's outbound one); "
                 f"{len(refused)} pod pair(s) refused by policy, named under the table; all up "
                 f"{time.monotonic() - started:.1f}s into this step")  # fmt: skip

    # 3
    async def traffic(self) -> None:
        self.step("3", "Traffic: pods talk through their tunnel; the underlay sees only ESP")
        src, dst_ip, dst = TALK
        cap = await self.lab_call("POST", "/capture/start", {"names": ["node-a", "node-b", src]})
        ping = await self.lab_call("POST", "/ping", {"pod": src, "dst": dst_ip, "count": 20, "interval": 0.05})
        tcp = await self.lab_call("POST", "/tcp", {"pod": src, "dst": dst_ip, "bytes": 65536})
        wire = await self.lab_call("POST", "/capture/stop", {"id": cap["id"]})
        self.say(f"ping {src} -> {dst} ({dst_ip}): {ping['sent']} sent, {ping['received']} received")
        state = "intact" if tcp["intact"] else "NOT intact"
        self.say(f"TCP: {tcp['sent']} bytes to {dst}'s echo server and back, {state} ({tcp['echoed']} echoed"
                 f", {tcp['seconds']}s)")  # fmt: skip
        for node in ("node-a", "node-b"):
            w = wire[node]
            spis = ", ".join(f"SPI {k}: {v}" for k, v in sorted(w["esp_by_spi"].items()))
            rest = "".join(f", {n} {what}" for what, n in sorted(w["others"].items()))
            pattern, lost = w["pattern_frames"], w["dropped_by_kernel"]
            self.say(f"  {node} underlay (eth0, egress): {w['frames']} frames: {w['esp']} ESP ({spis}); "
                     f"{w['pod_plaintext']} pod packets in clear; {w['arp']} ARP; {w['other']} other{rest}; "
                     f"the payload's byte pattern in {pattern}; capture lost {lost}")  # fmt: skip
        w = wire[src]
        self.say(f"  control, inside {src}: the same pattern in {w['pattern_frames']} of its {w['frames']} frames "
                 "(so its absence on the underlay means something)")  # fmt: skip

        src, dst_ip, dst = DENIED
        before = await self.lab_call("GET", "/stat?node=node-a")
        cap = await self.lab_call("POST", "/capture/start", {"names": ["node-a"]})
        ping = await self.lab_call("POST", "/ping", {"pod": src, "dst": dst_ip, "count": 5, "interval": 0.2})
        wire = await self.lab_call("POST", "/capture/stop", {"id": cap["id"]})
        after = await self.lab_call("GET", "/stat?node=node-a")
        blocked = after.get("XfrmOutPolBlock", 0) - before.get("XfrmOutPolBlock", 0)
        self.say(f"\nrefused pair: ping {src} -> {dst} ({dst_ip}): {ping['sent']} sent, {ping['received']} "
                 f"received; node-a's default block dropped {blocked} (XfrmOutPolBlock); on its underlay: "
                 f"{wire['node-a']['esp']} ESP, {wire['node-a']['pod_plaintext']} pod packets in clear")  # fmt: skip

    # 4
    async def revoke(self) -> None:
        self.step("4", "A policy edit revokes a pair: its tunnel and SAs go")
        src, dst_ip, dst = TALK
        src_ip = next(p["ip"] for p in self.pods() if p["name"] == src)
        pair = {f"{src_ip}/32", f"{dst_ip}/32"}

        async def pair_sas() -> int:
            count = 0
            for node in NODES:
                for sa in await self.lab_call("GET", f"/sas?node={node}"):
                    count += {sa["sel_src"], sa["sel_dst"]} == pair
            return count

        present = await pair_sas()
        path = self.mesh / REVOKE_FILE
        self.say(f"writing {path} (an AuthorizationPolicy: DENY shop/frontend -> app=frontend); "
                 f"{src}'s tunnel to {dst} holds {present} SAs across the two nodes")  # fmt: skip
        written = time.monotonic()
        path.write_text(REVOKE)
        await wait_for("the revoked pair's SAs gone", lambda: self._zero(pair_sas), 30, every=0.02)
        gone = time.monotonic() - written
        dumps = await self.dumps()
        removals = [r for d in dumps.values() for r in d["recent_removals"] if src_ip in r["tunnel"]]
        bridge = max((r["seconds"] for r in removals), default=float("nan"))
        ping = await self.lab_call("POST", "/ping", {"pod": src, "dst": dst_ip, "count": 5, "interval": 0.2})
        self.say(f"all {present} SAs gone {gone:.2f}s after the file was written (ztd sees it through inotify "
                 "and pushes after istiod's 100 ms debounce; "
                 f"from ztd's push to the SAs' removal the bridges took at most {bridge:.2f}s); "
                 f"ping now: {ping['sent']} sent, {ping['received']} received")  # fmt: skip
        path.unlink()
        restored = time.monotonic()
        await wait_for("the pair's tunnel back", lambda: pair_sas(), 60, every=0.1)
        self.say(f"file removed: the pair's tunnel is back {time.monotonic() - restored:.2f}s later")

    @staticmethod
    async def _zero(count: Callable[[], Any]) -> bool:
        return await count() == 0

    # 5
    async def rekey(self) -> None:
        self.step("5", "Make-before-break rekey under traffic")
        src, dst_ip, dst, src_ip = REKEY
        key = f"{src_ip}-{dst_ip}"

        def row(dumps: dict[str, dict[str, Any]]) -> dict[str, Any]:
            return next(r for r in dumps["node-a"]["tunnels"] if f"{r['local_address']}-{r['peer_address']}" == key)

        old = row(await self.dumps())
        cap = await self.lab_call("POST", "/capture/start", {"names": ["node-a"]})
        # 6 s of pings: ~1 s on the old keys, then the rekey (its handshake took over 1 s on a loaded CI host),
        # and seconds on the new keys
        flood = await self.lab_call("POST", "/flood/start", {"pod": src, "dst": dst_ip, "count": 600,
                                                              "interval": 0.01})  # fmt: skip
        await asyncio.sleep(1.0)  # traffic on the old keys first
        await self.ztctl("tunnels", "rekey", *self.bridge_flags(), "--node", "node-a", "--local", src_ip,
                         "--peer", dst_ip)  # fmt: skip
        new = await wait_for("the new generation", lambda: self._newer(row, old["generation"]), 30, every=0.1)
        result = await self.lab_call("POST", "/flood/wait", {"id": flood["id"]})
        wire = (await self.lab_call("POST", "/capture/stop", {"id": cap["id"]}))["node-a"]
        by_spi = wire["esp_by_spi"]
        lost = result["sent"] - result["received"]
        self.say(f"ping flood {src} -> {dst}: {result['sent']} sent, {result['received']} received, {lost} lost")
        self.say(f"generation {old['generation']} -> {new['generation']}: outbound SPI {old['spi_out']} carried "
                 f"{by_spi.get(old['spi_out'], 0)} packets on node-a's underlay, then {new['spi_out']} carried "
                 f"{by_spi.get(new['spi_out'], 0)}; the old SAs are removed after the grace period")  # fmt: skip

    async def _newer(self, row: Callable[[dict[str, dict[str, Any]]], dict[str, Any]], than: int) -> Any:
        current = row(await self.dumps())
        return current if current.get("generation", 0) > than else None

    # 6
    async def sidecars(self, stack: contextlib.AsyncExitStack) -> None:
        self.step("6", "The Envoy side: two sidecars, certificates from zt-agent (SDS), config from ztd (ADS)")
        from google.protobuf import json_format

        from ztcore.envoy.bootstrap import ads_bootstrap, node

        token = await self.token("node-a", "token-node-a-agent")
        agent = Agent(self.state / "sidecars" / "agent", token, self.state / "root-cert.pem")
        stack.push_async_callback(agent.stop)
        await agent.start()
        pods = yaml.safe_load_all((HERE / "60-sidecar-pods.yaml").read_text())
        sidecars = {d["metadata"]["name"]: d for d in pods if d and d["kind"] == "Pod"}
        envoys = {}
        for name, pod in sidecars.items():
            ns, ip, sa = pod["metadata"]["namespace"], pod["status"]["podIP"], pod["spec"]["serviceAccountName"]
            # No iptables capture in the demo: the sidecars bind their listeners (interception NONE).
            meta = {"NAMESPACE": ns, "SERVICE_ACCOUNT": sa, "INTERCEPTION_MODE": "NONE",
                    "ZTDPU_OUTBOUND_BIND": pod["metadata"]["annotations"]["demo.ztdpu.io/outbound-bind"]}  # fmt: skip
            proxy = node(f"sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local", meta)
            boot = ads_bootstrap(proxy, xds_address=("127.0.0.1", 15010), sds_socket=str(agent.socket), delta=True)
            envoy = Envoy(name, self.state / "sidecars")
            stack.push_async_callback(envoy.stop)
            await envoy.start(json_format.MessageToDict(boot, preserving_proto_field_name=True))
            envoys[name] = envoy
        app = await self.httpbin(stack)
        client = envoys["sleep-1"]
        ready = await wait_for("the sidecars' secrets and listeners", lambda: self._sidecars_ready(envoys), 60, 0.2)
        self.say(f"2 Envoy {ready} sidecars up (sleep-1 127.0.0.2, httpbin-1 127.0.0.3), one zt-agent for node-a")
        bind = sidecars["sleep-1"]["metadata"]["annotations"]["demo.ztdpu.io/outbound-bind"]
        url = f"http://{bind}:8000/headers"
        async with self.http.get(url, headers={"Host": "httpbin.web.svc.cluster.local"}) as resp:
            status, body = resp.status, await resp.text()
        self.say(f"sleep-1 -> its sidecar -> mTLS -> httpbin-1's sidecar -> app: HTTP {status}; the app saw "
                 f"client identity {app.get('xfcc', '(none)')}")  # fmt: skip
        if status != 200:
            raise DemoError(f"the request through the sidecars failed: HTTP {status}: {body[:200]}")
        self.say()
        await self.ztctl("proxy-status", "--plaintext", "--xds-address", "127.0.0.1:15010")
        self.say()
        await self.ztctl("proxy-config", "secret", client.admin)

    async def _sidecars_ready(self, envoys: dict[str, Envoy]) -> str:
        for envoy in envoys.values():
            async with self.http.get(f"http://{envoy.admin}/config_dump") as resp:
                dump = await resp.json()
            secrets = next((c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")), {})
            names = {s.get("name") for s in secrets.get("dynamic_active_secrets", [])}
            listeners = next((c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")), {})
            if not {"default", "ROOTCA"} <= names or not listeners.get("dynamic_listeners"):
                return ""
        async with self.http.get(f"http://{next(iter(envoys.values())).admin}/server_info") as resp:
            return str((await resp.json())["version"]).split("/")[1]

    async def httpbin(self, stack: contextlib.AsyncExitStack) -> dict[str, str]:
        """httpbin-1's application: on 127.0.0.1:18080 (its sidecar forwards there), reports the client it saw."""
        from aiohttp import web

        seen: dict[str, str] = {}

        async def headers(request: web.Request) -> web.Response:
            xfcc = request.headers.get("x-forwarded-client-cert", "")
            seen["xfcc"] = next((p.split("=", 1)[1] for p in xfcc.split(";") if p.startswith("URI=")), xfcc)
            return web.json_response({"headers": dict(request.headers)})

        app = web.Application()
        app.router.add_get("/headers", headers)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 18080).start()
        stack.push_async_callback(runner.cleanup)
        return seen

    def next_steps(self) -> None:
        assert self.lab is not None
        bridges = " ".join(self.bridge_flags())
        self.step("7", "Try this next, against the live demo")
        tries = [
            (f"export ZTD_STATE_DIR={self.state}", "ztctl finds ztd's root bundle and token issuer there"),
            (f"ztctl tunnels {bridges}", "both nodes' tunnels: identities, SPIs, age, bytes"),
            (f"ztctl tunnels rekey {bridges} --peer 10.244.2.20", "rekey now, make-before-break"),
            ("ztctl ztunnel-config workloads", "what ztd serves node agents (also: services, policies)"),
            ("ztctl proxy-status --plaintext --xds-address 127.0.0.1:15010", "who is connected to ztd"),
            ("curl -s 127.0.0.1:15014/debug/syncz", "istiod's debug endpoints, on ztd"),
            (f"$EDITOR {self.mesh}/40-authorization.yaml", "change a policy: the tunnels follow"),
            (f"curl -s http://{self.lab.address}:{ADMIN_PORTS['node-a']}/metrics", "node-a's zt-bridge metrics"),
        ]
        width = max(len(cmd) for cmd, _ in tries)
        for cmd, why in tries:
            self.say(f"  {cmd:<{width}}  # {why}")
        self.say(f"  logs: {self.state}/ztd.log, {self.state}/zt-bridge-node-*.log, {self.state}/sidecars/")

    async def until_interrupted(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.say(f"\nthe demo keeps running ({dt.datetime.now():%H:%M:%S}); Ctrl-C stops it")
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description="ztdpu: identities become encrypted pod-to-pod tunnels, live")
    parser.add_argument("--once", action="store_true", help="play the whole show, stop everything and exit")
    parser.add_argument("--state-dir", type=Path, default=Path(".ztd"), help="ztd's state folder [.ztd]")
    parser.add_argument(
        "--kernel",
        choices=("auto", "host", "uml"),
        default="auto",
        help="where the nodes run: this host's kernel (needs ESP), user-mode-linux, or auto",
    )
    args = parser.parse_args()
    try:
        return asyncio.run(Show(args).run())
    except DemoError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
