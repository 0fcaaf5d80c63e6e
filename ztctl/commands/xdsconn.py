"""Talking to a running ztd over xDS, as istioctl and ztunnel do: one channel, one stream, a few requests.

On the TLS port (default 127.0.0.1:15012) the caller authenticates like istioctl: a bearer token
(`--token`/`--token-file`), else a short-lived token for `istio-system/default` minted with the issuer
key in ztd's `--state-dir` (what `ztctl token create` uses); the server certificate is checked against
ztd's root bundle under the name `istiod.istio-system.svc`. `--plaintext` talks to ztd's 15010 instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import queue
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from sds.ca import issuer
from ztcore.config import Duration, option
from ztctl.errors import CliError

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SYSTEM_NAMESPACE = "istio-system"
MAX_MESSAGE = 200 * 1024 * 1024  # ztunnel's own limit: a large mesh's WDS is one big response


@dataclasses.dataclass(frozen=True)
class XdsOptions:
    """Where ztd is and how to authenticate; shared by the commands that read from a running ztd."""

    ENV_PREFIX = "ZTCTL"

    xds_address: str = option("127.0.0.1:15012", "ztd's xDS address (TLS unless --plaintext)", metavar="HOST:PORT")
    plaintext: bool = option(False, "no TLS and no credentials (ztd's plaintext xDS port, 15010)")
    state_dir: Path = option(Path(".ztd"), "ztd's state folder (root bundle, issuer key)", env="ZTD_STATE_DIR")
    root_cert: Path | None = option(None, "root bundle to trust [default: <state-dir>/root-cert.pem]")
    server_name: str = option("istiod.istio-system.svc", "name ztd's serving certificate is checked against")
    token: str = option("", "bearer token [default: minted for istio-system/default from --state-dir]")
    token_file: Path | None = option(None, "file holding the bearer token")
    trust_domain: str = option("cluster.local", "trust domain ztd runs with", env="TRUST_DOMAIN")
    timeout: Duration = option(Duration(10), "how long to wait for ztd")


@dataclasses.dataclass(frozen=True, slots=True)
class XdsTarget:
    address: str
    root_pem: bytes | None  # None: plaintext
    server_name: str
    token: str
    timeout: float

    @classmethod
    def of(cls, opts: XdsOptions, now: dt.datetime | None = None) -> XdsTarget:
        if not opts.xds_address or ":" not in opts.xds_address:
            raise CliError(f"--xds-address {opts.xds_address!r} is not HOST:PORT")
        if opts.timeout <= 0:
            raise CliError("--timeout must be positive")
        if opts.plaintext:
            return cls(opts.xds_address, None, opts.server_name, "", float(opts.timeout))
        root_path = opts.root_cert or opts.state_dir / "root-cert.pem"
        try:
            root = root_path.read_bytes()
        except OSError as err:
            raise CliError(f"cannot read root bundle {root_path}: {err.strerror} (or use --plaintext)") from None
        return cls(opts.xds_address, root, opts.server_name, _token(opts, now), float(opts.timeout))

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        if self.root_pem is None:
            return grpc.insecure_channel(self.address, options=options)
        creds = grpc.ssl_channel_credentials(self.root_pem)
        return grpc.secure_channel(
            self.address, creds, options=[*options, ("grpc.ssl_target_name_override", self.server_name)]
        )

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def _token(opts: XdsOptions, now: dt.datetime | None) -> str:
    if opts.token:
        return opts.token.strip()
    if opts.token_file is not None:
        try:
            return opts.token_file.read_text().strip()
        except OSError as err:
            raise CliError(f"cannot read {opts.token_file}: {err.strerror}") from None
    try:
        tokens = issuer.load(opts.state_dir / "issuer", opts.trust_domain)
        return tokens.mint(
            SYSTEM_NAMESPACE,
            "default",
            audiences=["istio-ca"],
            duration=dt.timedelta(minutes=10),
            now=now or dt.datetime.now(dt.UTC),
        )
    except issuer.IssuerError as err:
        raise CliError(
            f"no credential for {opts.xds_address}: give --token or --token-file, or --state-dir of ztd ({err})"
        ) from None


def node(kind: str, metadata: dict[str, Any] | None = None) -> base_pb2.Node:
    """`<kind>~127.0.0.1~ztctl-<random>.istio-system~istio-system.svc.cluster.local` (istioctl names itself
    the same way; the address is not used for what a debug or WDS client is sent)."""
    ip = "127.0.0.1"
    pod = f"ztctl-{secrets.token_hex(4)}"
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": SYSTEM_NAMESPACE, "NAME": pod, **(metadata or {})})
    node_id = f"{kind}~{ip}~{pod}.{SYSTEM_NAMESPACE}~{SYSTEM_NAMESPACE}.svc.cluster.local"
    return base_pb2.Node(id=node_id, metadata=meta)


def _failure(target: XdsTarget, err: grpc.RpcError) -> CliError:
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"cannot reach ztd at {target.address}: {err.details() or 'unavailable'}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"ztd at {target.address} did not answer within {target.timeout:g}s")
    return CliError(f"ztd at {target.address} refused: {code.name}: {err.details()}")


class _Outbox:
    """The request side of a stream: requests go in from this thread, the gRPC runtime pulls them."""

    def __init__(self, first: Sequence[Any]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        for item in first:
            self._queue.put(item)

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item


def sotw_once(target: XdsTarget, request: discovery_pb2.DiscoveryRequest) -> discovery_pb2.DiscoveryResponse:
    """Send one SotW request on a fresh stream and return the first response (istioctl's GetXdsResponse)."""
    outbox = _Outbox([request])
    with target.channel() as channel:
        method = channel.stream_stream(
            f"/{ADS_SERVICE}/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        responses = method(iter(outbox), metadata=target.metadata, timeout=target.timeout)
        try:
            resp = next(responses)
        except grpc.RpcError as err:
            raise _failure(target, err) from None
        except StopIteration:
            raise CliError(f"ztd at {target.address} closed the stream without an answer") from None
        finally:
            outbox.close()
            responses.cancel()
    assert isinstance(resp, discovery_pb2.DiscoveryResponse)
    return resp


def delta_initial(
    target: XdsTarget, node_msg: base_pb2.Node, type_urls: Sequence[str]
) -> dict[str, discovery_pb2.DeltaDiscoveryResponse]:
    """Subscribe (wildcard) to each type on one Delta stream, as ztunnel's first requests do, ACK each
    first response and return them by type."""
    first = []
    for i, type_url in enumerate(type_urls):
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
        if i == 0:
            req.node.CopyFrom(node_msg)
        first.append(req)
    outbox = _Outbox(first)
    out: dict[str, discovery_pb2.DeltaDiscoveryResponse] = {}
    with target.channel() as channel:
        method = channel.stream_stream(
            f"/{ADS_SERVICE}/DeltaAggregatedResources",
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        responses = method(iter(outbox), metadata=target.metadata, timeout=target.timeout)
        try:
            for resp in responses:
                out.setdefault(resp.type_url, resp)
                outbox.put(discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce))
                if len(out) == len(type_urls):
                    break
            else:
                raise CliError(f"ztd at {target.address} closed the stream before answering every type")
        except grpc.RpcError as err:
            raise _failure(target, err) from None
        finally:
            outbox.close()
            responses.cancel()
    return out
