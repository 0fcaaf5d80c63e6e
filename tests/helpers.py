"""Shared test helpers: CSRs, free ports, a CA client and an in-process ztd."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2

from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from xds_server.main import StartupError, Ztd, ZtdConfig

ISTIOD_NAME = "istiod.istio-system.svc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key(kind: str = "ec256") -> Any:
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ec521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def make_csr(key: Any, sans: list[str] | None = None, org: str = "cluster.local") -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(s) for s in sans]), critical=False
        )
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algo).public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def request(csr: str, ttl: int = 0, **metadata: Any) -> ca_pb2.IstioCertificateRequest:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl, metadata=meta)


def bearer(token: str, **extra: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), *extra.items()]


@dataclasses.dataclass
class RunningZtd:
    ztd: Ztd
    cfg: ZtdConfig
    root_pem: bytes

    def secure_channel(self, client_key: Any = None, client_chain: bytes | None = None) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            self.root_pem, key_pem(client_key) if client_key is not None else None, client_chain
        )
        return grpc.aio.secure_channel(
            f"127.0.0.1:{self.cfg.secure_port}", creds, options=[("grpc.ssl_target_name_override", ISTIOD_NAME)]
        )

    def ca(self, channel: grpc.aio.Channel) -> ca_pb2_grpc.IstioCertificateServiceStub:
        return ca_pb2_grpc.IstioCertificateServiceStub(channel)

    def token(
        self,
        account: str,
        *,
        audience: str = "istio-ca",
        duration: float = 3600,
        pod: str = "",
        node: str = "",
        pod_uid: str | None = None,
        now: dt.datetime | None = None,
    ) -> str:
        from sds.ca import issuer
        from ztcore.mesh.registry.objects import default_uid

        ns, sa = account.split("/")
        tokens = issuer.load(self.cfg.state_dir / "issuer", self.cfg.trust_domain)
        uid = pod_uid if pod_uid is not None else (default_uid("Pod", ns, pod) if pod else "")
        return tokens.mint(
            ns,
            sa,
            audiences=[audience],
            duration=dt.timedelta(seconds=duration),
            now=now or dt.datetime.now(dt.UTC),
            pod_name=pod,
            pod_uid=uid,
            node_name=node,
        )


async def until_ready(task: asyncio.Task[None], ready: asyncio.Event, what: str) -> None:
    """Wait (at most 20 s) until `ready` is set; if `task`, the server's run, ends first, raise what it raised."""
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
    assert waiter in done, f"{what} did not become ready"


@contextlib.asynccontextmanager
async def running_ztd(tmp: Path, config_dir: Path | None = None, **overrides: Any) -> AsyncIterator[RunningZtd]:
    # free_port() hands out a port that is free now; an outgoing connection of this busy process can take it from
    # the ephemeral range before ztd binds it: the ports are then picked again (at most 3 tries)
    tries = 3
    for attempt in range(tries):
        cfg = ZtdConfig(
            listen_address="127.0.0.1",
            xds_port=free_port(),
            secure_port=free_port(),
            monitoring_port=free_port(),
            state_dir=tmp / "state",
            config_dir=config_dir,
            **overrides,
        )
        ztd = Ztd(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(ztd.run(stop))
        try:
            await until_ready(task, ztd.ready, "ztd")
        except StartupError as err:
            if "address already in use" in str(err) and attempt + 1 < tries:
                continue
            raise
        break
    try:
        yield RunningZtd(ztd, cfg, cfg.published_root.read_bytes())
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def write_yaml(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def metadata_dict(pairs: Mapping[str, str]) -> list[tuple[str, str]]:
    return list(pairs.items())
