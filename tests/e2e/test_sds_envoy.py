"""Real Envoy 1.40 sidecars taking their identity from zt-agent, with ztd as the CA.

Two sidecars share one agent: `frontend` (client side: plain HTTP in, mTLS out, one request per
connection so every request is a fresh handshake) and `cart` (server side: mTLS in, client certificate
required, only the frontend SPIFFE identity accepted). The agent holds a node-agent (ztunnel) token and
gets each sidecar's certificate by impersonation, which ztd authorizes from its registry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from sds.agent.main import Agent
from sds.ca import keyring
from tests.helpers import RunningZtd, bearer, free_port, key_pem, make_csr, new_key, request, running_ztd, write_yaml
from tests.support import envoy as ev
from tests.support.agent import CART, FRONTEND, MESH, OTHER, agent_for, short_dir
from tests.support.wait import eventually
from ztcore.identity import Identity
from ztcore.xds import status as st
from ztctl.commands import proxy_config

pytestmark = pytest.mark.slow


@dataclass
class Mesh:
    ztd: RunningZtd
    agent: Agent
    server: ev.EnvoyProcess
    client: ev.EnvoyProcess
    inbound: int
    outbound: int
    workdir: Path
    file_port: int = 0
    files: Path | None = None


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, *, ttl: float = 3600.0, files: Path | None = None) -> AsyncIterator[Mesh]:
    write_yaml(tmp_path / "mesh", "mesh.yaml", MESH)
    async with running_ztd(tmp_path, config_dir=tmp_path / "mesh") as ztd, agent_for(ztd, secret_ttl=ttl) as agent:
        inbound, outbound, file_port = free_port(), free_port(), free_port()
        listeners = [ev.inbound_listener("inbound", inbound, allowed=[FRONTEND], body="hello from cart\n")]
        if files is not None:
            listeners.append(
                ev.inbound_listener(
                    "files",
                    file_port,
                    cert=f"file-cert:{files}/cert.pem~{files}/key.pem",
                    ca=f"file-root:{files}/root.pem",
                    allowed=[FRONTEND],
                    body="hello from files\n",
                )
            )
        server_cfg = ev.sidecar_bootstrap("shop", "cart", agent.cfg.socket, listeners=listeners)
        client_cfg = ev.sidecar_bootstrap(
            "shop",
            "frontend",
            agent.cfg.socket,
            clusters=[ev.mtls_cluster("cart", inbound, allowed=[CART])],
            listeners=[ev.outbound_listener("outbound", outbound, "cart")],
        )
        workdir = tmp_path / "envoy"
        async with (
            ev.running_envoy("cart", server_cfg, workdir) as server,
            ev.running_envoy("frontend", client_cfg, workdir) as client,
        ):
            yield Mesh(ztd, agent, server, client, inbound, outbound, workdir, file_port, files)


# -- clients ------------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests through the frontend sidecar, one after another, until stopped; every outcome counted."""

    port: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while not self._stop.is_set():
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/") as resp:
                        body = await resp.text()
                        if resp.status == 200 and body == "hello from cart\n":
                            self.ok += 1
                            self.peers.add(resp.headers.get("x-peer-identity", ""))
                        else:
                            self.failures.append(f"{resp.status}: {body[:120]}")
                except (aiohttp.ClientError, TimeoutError) as err:
                    self.failures.append(repr(err))

    def start(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def _probe(port: int, roots: bytes, chain: bytes | None, key: bytes | None, workdir: Path) -> tuple[int, str]:
    """One TLS connection + GET straight to a sidecar listener. (server serial, status line or error)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE certificates carry a URI SAN, no host name
    ctx.load_verify_locations(cadata=roots.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    if chain is not None and key is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "probe-chain.pem").write_bytes(chain)
        (workdir / "probe-key.pem").write_bytes(key)
        ctx.load_cert_chain(workdir / "probe-chain.pem", workdir / "probe-key.pem")
    serial = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            serial = x509.load_der_x509_certificate(der).serial_number if der else 0
            tls.sendall(b"GET / HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    except (OSError, ssl.SSLError) as err:
        return serial, f"refused: {type(err).__name__}: {err}"
    return serial, data.decode(errors="replace")


async def probe(
    port: int, roots: bytes, chain: bytes | None = None, key: bytes | None = None, workdir: Path = Path()
) -> tuple[int, str]:
    return await asyncio.to_thread(_probe, port, roots, chain, key, workdir)


async def issue(ztd: RunningZtd, account: str) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) for `account`, straight from a CA."""
    key = new_key()
    async with ztd.secure_channel() as ch:
        resp = await ztd.ca(ch).CreateCertificate(request(make_csr(key)), metadata=bearer(ztd.token(account)))
    return "".join(resp.cert_chain[:-1]).encode(), key_pem(key)


# -- what Envoy holds -----------------------------------------------------------------------------------------


def _certs(section: dict, name: str) -> list[x509.Certificate]:
    for entry in section.get("dynamic_active_secrets", []):
        if entry.get("name") == name:
            sec = entry.get("secret", {})
            data = (sec.get("tls_certificate", {}).get("certificate_chain") or {}).get("inline_bytes") or (
                sec.get("validation_context", {}).get("trusted_ca") or {}
            ).get("inline_bytes")
            return x509.load_pem_x509_certificates(base64.b64decode(data)) if data else []
    return []


async def held(envoy: ev.EnvoyProcess, name: str) -> list[x509.Certificate]:
    return _certs(await envoy.secrets(), name)


async def ssl_errors(envoy: ev.EnvoyProcess, port: int) -> dict[str, int]:
    stats = await envoy.stats(f"listener.127.0.0.1_{port}.ssl")
    return {k.rsplit(".", 1)[-1]: v for k, v in stats.items()}


# -- tests ------------------------------------------------------------------------------------------------------


async def test_mtls_with_spiffe_identities_and_refusals(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        traffic = Traffic(m.outbound).start()
        await asyncio.sleep(0.3)
        await traffic.stop()
        assert traffic.ok > 0 and traffic.failures == [] and traffic.peers == {FRONTEND}
        served = await held(m.server, "default")
        assert served[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        ) == [CART]
        roots = m.ztd.root_pem
        good = await issue(m.ztd, "shop/frontend")
        wrong = await issue(m.ztd, "shop/other")
        async with running_ztd(tmp_path / "foreign") as other:
            foreign = await issue(other, "shop/frontend")
        probes = m.workdir / "probes"
        serial, answer = await probe(m.inbound, roots, *good, workdir=probes)
        assert answer.startswith("HTTP/1.1 200") and f"x-peer-identity: {FRONTEND}" in answer
        assert serial == served[0].serial_number
        for name, creds in (("no cert", (None, None)), ("foreign CA", foreign), (f"identity {OTHER}", wrong)):
            _, answer = await probe(m.inbound, roots, *creds, workdir=probes)
            assert answer.startswith("refused"), f"{name} was let in: {answer[:80]}"
        errors = await ssl_errors(m.server, m.inbound)
        assert errors.get("fail_verify_no_cert", 0) >= 1
        assert errors.get("fail_verify_error", 0) >= 1  # the foreign chain
        assert errors.get("fail_verify_san", 0) >= 1  # our CA, wrong identity


async def test_rotation_changes_the_serial_without_restart_or_failure(tmp_path: Path) -> None:
    async with mesh(tmp_path, ttl=4.0) as m:
        pids = (m.server.pid, m.client.pid)
        client_first = (await held(m.client, "default"))[0].serial_number
        good = await issue(m.ztd, "shop/frontend")
        traffic = Traffic(m.outbound).start()
        serials: list[int] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 7.0
        while loop.time() < end:
            serial, answer = await probe(m.inbound, m.ztd.root_pem, *good, workdir=m.workdir / "probes")
            assert answer.startswith("HTTP/1.1 200"), answer[:120]
            if not serials or serials[-1] != serial:
                serials.append(serial)
            await asyncio.sleep(0.1)
        await traffic.stop()
        print(f"rotation: {len(serials)} serving certificates, {traffic.ok} requests, {len(traffic.failures)} failed")
        assert len(serials) >= 3, f"the serving certificate rotated {len(serials) - 1} time(s) in 7s"
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.ok > 50
        assert (m.server.pid, m.client.pid) == pids
        assert m.server.process.returncode is None and m.client.process.returncode is None
        assert (await held(m.client, "default"))[0].serial_number != client_first
        errors = await ssl_errors(m.server, m.inbound)
        assert errors.get("connection_error", 0) == 0 and errors.get("handshake", 0) >= traffic.ok
        assert m.agent.streams.streams() and all(
            w.status == st.SYNCED or w.status == st.STALE
            for s in m.agent.streams.streams()
            for w in s.statuses().values()
        )


async def test_root_rotation_with_overlap_never_fails_a_handshake(tmp_path: Path) -> None:
    async with mesh(tmp_path, ttl=4.0) as m:
        ztd = m.ztd.ztd
        old = ztd.material
        new = keyring.create_self_signed(
            "ecdsa-p256", "cluster.local", dt.timedelta(days=3650), dt.datetime.now(dt.UTC)
        )
        old_root, new_root = old.roots[0], new.roots[0]
        traffic = Traffic(m.outbound).start()
        envoys = (m.server, m.client)

        async def bundles_are(expected: list[x509.Certificate]) -> bool:
            got = [await held(e, "ROOTCA") for e in envoys]
            return all(g == expected for g in got)

        async def leaves_signed_by(root: x509.Certificate) -> bool:
            for e in envoys:
                leaf = (await held(e, "default"))[0]
                try:
                    leaf.verify_directly_issued_by(root)
                except Exception:
                    return False
            return True

        # 1. The new root joins the bundle; leaves still come from the old root.
        ztd.material = keyring.CAMaterial(old.signing_cert, old.signing_key, old.chain, (old_root, new_root), "both")
        await eventually(lambda: bundles_are([old_root, new_root]), within=15, what="both roots in every sidecar")
        # 2. The CA signs with the new root: leaves move as they renew.
        ztd.material = keyring.CAMaterial(new.signing_cert, new.signing_key, (), (old_root, new_root), "new signs")
        await eventually(lambda: leaves_signed_by(new_root), within=15, what="leaves from the new root")
        # 3. The old root leaves the bundle.
        ztd.material = keyring.CAMaterial(new.signing_cert, new.signing_key, (), (new_root,), "new only")
        await eventually(lambda: bundles_are([new_root]), within=15, what="only the new root")
        await asyncio.sleep(1.0)  # and traffic goes on with the new root alone
        await traffic.stop()
        print(f"root rotation: {traffic.ok} requests, {len(traffic.failures)} failed")
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.ok > 50
        errors = await ssl_errors(m.server, m.inbound)
        assert errors.get("connection_error", 0) == 0
        assert errors.get("fail_verify_error", 0) == 0 and errors.get("fail_verify_san", 0) == 0


async def test_invalid_file_secret_is_nacked_and_the_previous_one_kept(tmp_path: Path) -> None:
    files = short_dir()
    try:
        async with running_ztd(tmp_path / "seed") as seed:
            first = await issue(seed, "shop/cart")
            second = await issue(seed, "shop/cart")
            caller = await issue(seed, "shop/frontend")  # what the file root trusts
            roots = seed.root_pem
        (files / "cert.pem").write_bytes(first[0])
        (files / "key.pem").write_bytes(first[1])
        (files / "root.pem").write_bytes(roots)
        name = f"file-cert:{files}/cert.pem~{files}/key.pem"
        async with mesh(tmp_path, files=files) as m:
            serial_before, answer = await probe(m.file_port, roots, *caller, workdir=m.workdir / "probes")
            assert answer.startswith("HTTP/1.1 200")
            state = file_stream_state(m.agent, name)
            good_version = state.acked[name]
            # A certificate whose key is not in key.pem: Envoy must reject it.
            (files / "cert.pem").write_bytes(second[0])

            async def rejected() -> bool:
                return file_stream_state(m.agent, name).status == st.ERROR

            await eventually(rejected, within=15, what="Envoy's NACK")
            state = file_stream_state(m.agent, name)
            assert state.acked[name] == good_version and state.sent[name] != good_version
            assert state.last_error, "Envoy's reason is recorded"
            serial_after, answer = await probe(m.file_port, roots, *caller, workdir=m.workdir / "probes")
            assert answer.startswith("HTTP/1.1 200") and serial_after == serial_before
            # (Envoy's /config_dump already lists the rejected secret; the handshake above is what it serves.)
            # Fixing the key makes the new certificate acceptable; the ACK clears the error.
            (files / "key.pem").write_bytes(second[1])

            async def fixed() -> bool:
                return file_stream_state(m.agent, name).status == st.SYNCED

            await eventually(fixed, within=15, what="the ACK of the fixed pair")
            serial_fixed, _ = await probe(m.file_port, roots, *caller, workdir=m.workdir / "probes")
            assert serial_fixed == x509.load_pem_x509_certificate(second[0]).serial_number
    finally:
        await asyncio.to_thread(shutil.rmtree, files, True)


def file_stream_state(agent: Agent, name: str) -> st.WatchState:
    for info in agent.streams.streams():
        for w in info.statuses().values():
            if name in w.names:
                return w
    raise AssertionError(f"no stream watches {name}")


async def test_proxy_config_secret_against_a_live_envoy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ztctl.cli import main as ztctl

    async with mesh(tmp_path) as m:
        assert await asyncio.to_thread(ztctl, ["proxy-config", "secret", m.server.admin]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == [
            "RESOURCE",
            "NAME",
            "TYPE",
            "STATUS",
            "VALID",
            "CERT",
            "SERIAL",
            "NUMBER",
            "NOT",
            "AFTER",
            "NOT",
            "BEFORE",
        ]
        rows = {line.split()[0]: line.split() for line in table[1:]}
        cart = m.agent.secrets.current(Identity.parse(CART))
        assert cart is not None
        assert rows["default"][1:] == [
            "Cert",
            "Chain",
            "ACTIVE",
            "true",
            f"{cart.serial:x}",
            cart.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            cart.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ]
        root = x509.load_pem_x509_certificate(m.ztd.root_pem)
        assert rows["ROOTCA"][1:5] == ["CA", "ACTIVE", "true", f"{root.serial_number:x}"]
        assert await asyncio.to_thread(ztctl, ["proxy-config", "secret", m.server.admin, "-o", "json"]) == 0
        dump = json.loads(capsys.readouterr().out)
        assert {s["name"] for s in dump["dynamicActiveSecrets"]} == {"default", "ROOTCA"}
        assert proxy_config.secret_rows(
            proxy_config.secrets_section(await m.server.config_dump()), dt.datetime.now(dt.UTC)
        )
    dead = f"127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(ztctl, ["proxy-config", "secret", dead, "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ztctl proxy-config secret: cannot reach Envoy admin at {dead}") and "\n" not in err
