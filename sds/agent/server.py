"""The SDS listener: envoy.service.secret.v3.SecretDiscoveryService on a Unix socket.

StreamSecrets runs on the shared xDS engine; DeltaSecrets and FetchSecrets answer Unimplemented, as
pilot-agent's do. The socket folder is 0700 and the socket 0600: whoever can open it gets private keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from ztcore.xds.grpc_adapter import XdsStreams

log = logging.getLogger(__name__)

SOCKET_SUBPATH = Path("var/run/secrets/workload-spiffe-uds/socket")
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class SdsServerError(Exception):
    pass


def socket_path(root: Path) -> Path:
    return root / SOCKET_SUBPATH


class SdsServicer:
    """Duck-typed servicer (xds-protos ships no stubs to subclass with types)."""

    def __init__(self, streams: XdsStreams) -> None:
        self._streams = streams

    async def StreamSecrets(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self._streams.sotw(request_iterator, context)

    async def DeltaSecrets(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeltaSecrets is not implemented; use StreamSecrets")

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DiscoveryResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "FetchSecrets is not implemented; use StreamSecrets")
        raise AssertionError("abort returned")


def _prepare(path: Path) -> None:
    """Private folder; a leftover socket is removed unless another agent still answers on it."""
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise SdsServerError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --socket-root")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SdsServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
        return
    finally:
        probe.close()
    raise SdsServerError(f"another process is serving on {path}")


class SdsServer:
    def __init__(self, path: Path, streams: XdsStreams) -> None:
        self.path = path
        self._streams = streams
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        await asyncio.to_thread(_prepare, self.path)
        server = grpc.aio.server()
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(SdsServicer(self._streams), server)
        try:
            server.add_insecure_port(f"unix:{self.path}")
        except RuntimeError as err:
            raise SdsServerError(f"cannot listen on {self.path}: {err}") from None
        await server.start()
        os.chmod(self.path, 0o600)
        self._server = server
        log.info("SDS listening on %s", self.path)

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
