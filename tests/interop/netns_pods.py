"""Pods as network namespaces: one L2 segment (a bridge in a namespace of its own), the host on it too.

    host netns            <tag>-br netns              pod netns (one per pod)
    <tag>h 10.244.K.1 --- uplink ─┐
                                  br0 ── p<i> ─────── eth0 10.244.K.<n>/24, default via 10.244.K.1, lo up
                                      └─ ...

Every pod and the host share one /24, so pods reach each other and the host without any forwarding (the host's
ip_forward is left alone). A pod's default route points at the host: a connection to a Service VIP, which no
interface owns, must get past routing before istio-iptables' nat OUTPUT rule redirects it to Envoy.

The test process stays in the host namespace and makes sockets inside a pod's namespace from a thread that
entered it (ipsec_bridge.netns.Netns); a socket keeps its namespace whatever thread uses it later, so the event loop
drives them as any other. Such sockets belong to root, not to the proxy uid, so istio-iptables captures them as
an application's. Programs (pilot-agent, iptables-save) run in a pod with `ip netns exec`.

Everything is deleted on exit, also after a failure: namespaces (their veths go with them) and the host's veth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipsec_bridge.netns import Netns

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_UID = 1337  # Istio's proxy uid and gid (injection template, istio-iptables -u default)
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"  # where Istio's inbound clusters bind upstream connections to the app


class NetnsPodsError(Exception):
    """The pod network could not be built; the message names the command and what it printed."""


def tool(name: str) -> str:
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        raise NetnsPodsError(f"{name} is not installed; the capture test needs it (Debian: apt-get install iptables)")
    return found


def require_tools() -> None:
    """Fails with one clear message when a program the harness or istio-iptables runs is missing."""
    if os.geteuid() != 0:
        raise NetnsPodsError("network namespaces and iptables need root")
    for name in ("ip", "setpriv", "iptables-save", "iptables-restore"):
        tool(name)


async def run(*argv: str, check: bool = True, within: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": SBIN_PATH, "HOME": os.environ.get("HOME", "/root")},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    done = subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(errors="replace"), err.decode())
    if check and done.returncode != 0:
        raise NetnsPodsError(f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


# -- talking from inside a pod --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    _ns: Netns = field(repr=False)

    async def new_socket(self) -> socket.socket:
        sock = await self._ns.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.setblocking(False)
        return sock

    async def connect(
        self, host: str, port: int, *, within: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self.new_socket()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), within)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def listen(self, port: int, address: str = "0.0.0.0") -> socket.socket:  # noqa: S104 - a pod's app
        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(64)
            sock.setblocking(False)
            return sock

        return await self._ns.run(bind)

    async def http(
        self, host: str, port: int, path: str = "/", *, authority: str | None = None, within: float = 5.0
    ) -> HttpReply:
        """One HTTP/1.1 GET on a new connection (`Connection: close`, so every request is a new connection)."""
        reader, writer = await self.connect(host, port, within=within)
        try:
            head = f"GET {path} HTTP/1.1\r\nHost: {authority or host}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), within)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return parse_http_reply(raw)

    async def tcp_exchange(self, host: str, port: int, data: bytes, *, within: float = 5.0) -> bytes:
        """Sends `data`, reads until as many bytes came back or the peer closed; b"" means closed without a byte
        (a reset counts as closed too). A connection that stays open and silent raises TimeoutError."""
        reader, writer = await self.connect(host, port, within=within)
        got = b""
        try:
            writer.write(data)
            await writer.drain()
            while len(got) < len(data):
                chunk = await asyncio.wait_for(reader.read(len(data) - len(got)), within)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return got

    async def exec(self, *argv: str, check: bool = True, within: float = 30.0) -> subprocess.CompletedProcess[str]:
        return await run(tool("ip"), "netns", "exec", self.netns, *argv, check=check, within=within)

    async def iptables_save(self) -> str:
        return (await self.exec(tool("iptables-save"))).stdout


def parse_http_reply(raw: bytes) -> HttpReply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP response ({len(raw)} bytes): {raw[:200]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return HttpReply(int(parts[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


# -- apps inside a pod ---------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What an app saw: one entry per request or connection."""

    peers: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(sock: socket.socket, handle: Handler) -> asyncio.Server:
    return await asyncio.start_server(handle, sock=sock)


@contextlib.asynccontextmanager
async def http_app(pod: Pod, port: int, name: str) -> AsyncIterator[Seen]:
    """An HTTP/1.1 app on 0.0.0.0:`port` that answers 200 with a JSON body: its name, the peer address and the
    request headers (so the caller sees the x-forwarded-client-cert its sidecar was given)."""
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while True:  # keep-alive: Envoy reuses its upstream connections
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode(errors="replace").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    if key:
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                seen.peers.append(peer)
                seen.headers.append(headers)
                body = json.dumps({"app": name, "peer": peer, "headers": headers}).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n".encode()
                    + (b"Connection: close\r\n" if close else b"")
                    + b"\r\n"
                    + body
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await _serve(await pod.listen(port), handle)
    try:
        yield seen
    finally:
        server.close()


@contextlib.asynccontextmanager
async def tcp_echo_app(pod: Pod, port: int) -> AsyncIterator[Seen]:
    """A TCP app on 0.0.0.0:`port` that writes back whatever it reads; `peers` lists each connection's source."""
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.peers.append(writer.get_extra_info("peername")[0])
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await _serve(await pod.listen(port), handle)
    try:
        yield seen
    finally:
        server.close()


# -- a relay from the segment to a host-local port -----------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_relay(listen_host: str, target: tuple[str, int]) -> AsyncIterator[int]:
    """Listens on `listen_host` (host namespace, an address the pods reach) and splices each connection to
    `target`: ztd's in-process test server binds 127.0.0.1 only. Yields the port. TLS passes through untouched."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.write_eof()

    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(track, listen_host, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the network ---------------------------------------------------------------------------------------------


@dataclass
class PodNetwork:
    tag: str
    prefix: str  # "10.244.K": pods get <prefix>.<n>, the host <prefix>.1
    pods: dict[str, Pod] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)  # created so far, deleted on exit

    @property
    def host_ip(self) -> str:
        return f"{self.prefix}.1"

    @property
    def bridge_netns(self) -> str:
        return f"{self.tag}-br"

    @property
    def host_link(self) -> str:
        return f"{self.tag}h"

    def __getitem__(self, name: str) -> Pod:
        return self.pods[name]

    async def _add_netns(self, name: str) -> None:
        await run(tool("ip"), "netns", "add", name)
        self.namespaces.append(name)
        await run(tool("ip"), "-n", name, "link", "set", "lo", "up")

    async def _build(self, pods: Sequence[tuple[str, int]]) -> None:
        ip = tool("ip")
        br = self.bridge_netns
        await self._add_netns(br)
        await run(ip, "-n", br, "link", "add", "br0", "type", "bridge")
        await run(ip, "-n", br, "link", "set", "br0", "up")
        # The host's leg: created here, its peer moved straight into the bridge namespace.
        await run(ip, "link", "add", self.host_link, "type", "veth", "peer", "name", "uplink", "netns", br)
        await run(ip, "-n", br, "link", "set", "uplink", "master", "br0", "up")
        await run(ip, "addr", "add", f"{self.host_ip}/24", "dev", self.host_link)
        await run(ip, "link", "set", self.host_link, "up")
        for index, (name, host_octet) in enumerate(pods):
            netns = f"{self.tag}-{name}"
            await self._add_netns(netns)
            leg = f"p{index}"
            await run(ip, "-n", br, "link", "add", leg, "type", "veth", "peer", "name", "eth0", "netns", netns)
            await run(ip, "-n", br, "link", "set", leg, "master", "br0", "up")
            pod_ip = f"{self.prefix}.{host_octet}"
            await run(ip, "-n", netns, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
            await run(ip, "-n", netns, "link", "set", "eth0", "up")
            await run(ip, "-n", netns, "route", "add", "default", "via", self.host_ip)
            self.pods[name] = Pod(name, netns, pod_ip, Netns(netns))

    async def teardown(self) -> list[str]:
        """Deletes what was made; returns the failures (so a caller can report them without hiding an error)."""
        problems = []
        for pod in self.pods.values():
            pod._ns.close()
        for name in reversed(self.namespaces):
            done = await run(tool("ip"), "netns", "del", name, check=False)
            if done.returncode != 0:
                problems.append(f"ip netns del {name}: {done.stderr.strip()}")
        # Deleting the bridge namespace destroyed `uplink` and with it its peer; make sure of it.
        if await asyncio.to_thread(os.path.exists, f"/sys/class/net/{self.host_link}"):
            await run(tool("ip"), "link", "del", self.host_link, check=False)
        return problems


async def _free_prefix() -> str:
    """A 10.244.K.0/24 that no host interface or route uses (other tests may run pod networks too)."""
    routes = (await run(tool("ip"), "-4", "route", "show", "table", "all")).stdout
    addrs = (await run(tool("ip"), "-4", "addr")).stdout
    taken = routes + addrs
    candidates = list(range(100, 250))
    random.shuffle(candidates)
    for k in candidates:
        if f"10.244.{k}." not in taken:
            return f"10.244.{k}"
    raise NetnsPodsError("no free 10.244.K.0/24 for a pod network")


@contextlib.asynccontextmanager
async def pod_network(pods: Sequence[tuple[str, int]]) -> AsyncIterator[PodNetwork]:
    """Pods named by `pods` ((name, last octet of its IP), octet 2..254), on a fresh segment."""
    require_tools()
    if any(not 2 <= octet <= 254 for _, octet in pods) or len({o for _, o in pods}) != len(pods):
        raise NetnsPodsError(f"pod addresses must be distinct octets in 2..254: {pods}")
    net = PodNetwork(tag=f"zt{os.getpid() % 1000:03d}{random.randrange(16**3):03x}", prefix=await _free_prefix())
    try:
        await net._build(pods)
        yield net
    finally:
        problems = await net.teardown()
        if problems:
            raise NetnsPodsError("pod network teardown: " + "; ".join(problems))


# -- istio-iptables --------------------------------------------------------------------------------------------


def istio_iptables_argv(pilot_agent: Path, *, exclude_inbound: Sequence[int] = (15090, 15021, 15020)) -> list[str]:
    """What Istio's injection template gives its istio-init container (REDIRECT mode), run through pilot-agent's
    built-in `istio-iptables` subcommand: outbound to Envoy's 15001, inbound to 15006, all ports and addresses,
    the proxy uid 1337 left alone, the agent's own ports kept off inbound capture."""
    return [
        str(pilot_agent),
        "istio-iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        str(PROXY_UID),
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        ",".join(str(p) for p in exclude_inbound),
        "--log_output_level=default:info",
    ]


async def program_capture(pod: Pod, pilot_agent: Path) -> str:
    """Runs istio-iptables in the pod (as root, as the init container does); returns the pod's iptables-save."""
    await pod.exec(*istio_iptables_argv(pilot_agent), within=60)
    return await pod.iptables_save()


def expose(path: Path, folder: Path) -> Path:
    """`path` made reachable by the proxy uid: a hard link (or a copy) in `folder`, a world-searchable folder
    (not pytest's tmp_path, which is 0700). The tool cache sits under root's 0700 home, where uid 1337 cannot
    look up anything."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)  # noqa: S103 - searchable by uid 1337; it holds only public binaries
    target = folder / path.name
    if not target.exists():
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return target
