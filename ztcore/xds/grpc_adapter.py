"""Binds the stream machines to grpc.aio bidirectional streams (SDS StreamSecrets, ADS SotW and Delta).

Per stream: the first request carries the node; the `Source` turns it into a binding (which scopes of the
cache the stream sees, and what to start when names are subscribed). Requests and cache changes enter one
queue, so the machine sees them in order on the event loop; its responses are written as they come out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from ztcore.metrics import Registry
from ztcore.untrusted import clip
from ztcore.xds import status as st
from ztcore.xds.cache import Change, SnapshotCache
from ztcore.xds.delta import DeltaStream
from ztcore.xds.sotw import SotwStream
from ztcore.xds.typeurls import short_name

log = logging.getLogger(__name__)

NODE_ID_LIMIT = 128  # what of a node id goes into stream ids and log lines


class SourceError(Exception):
    """A request the source cannot serve; ends the stream with this gRPC status. The message may quote what the
    client sent, so it is clipped before anyone logs it or sends it back."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = clip(message, 512)
        super().__init__(message)
        self.code = code
        self.message = message


class StreamBinding(Protocol):
    """What a source attaches to one stream."""

    @property
    def scopes(self) -> tuple[str, ...]: ...

    async def subscribe(self, type_url: str, names: frozenset[str]) -> None:
        """Names newly watched (make sure the cache will hold them). Raise SourceError to refuse."""
        ...

    async def unsubscribe(self, type_url: str, names: frozenset[str]) -> None: ...

    async def close(self) -> None: ...


class Source(Protocol):
    async def open_stream(self, node: base_pb2.Node, peer: str) -> StreamBinding:
        """Bind a new stream from `node`. Raise SourceError to refuse it."""
        ...


class _Machine(Protocol):
    node: base_pb2.Node | None

    def handle_request(self, req: Any, now: dt.datetime) -> st.Step: ...

    def handle_change(self, change: Change, now: dt.datetime) -> tuple[Any, ...]: ...

    def handle_plain_ack(self, req: Any, now: dt.datetime) -> st.Step | None:
        """The request handled if it is an ACK that needs no answer and no source call; else None (untouched)."""
        ...

    def statuses(self) -> dict[str, st.WatchState]: ...


NACK_LOG_INTERVAL = 60.0  # seconds: one NACK line per stream and type, the rest counted into the next one


@dataclass(slots=True)
class NackLog:
    """Per stream and type: when a NACK was last logged, and how many came since without a line."""

    logged_at: dt.datetime | None = None
    suppressed: int = 0


@dataclass(slots=True)
class StreamInfo:
    """A live stream, for /debug/syncz-style status and for tests."""

    id: str
    peer: str
    node: base_pb2.Node
    protocol: str  # "sotw" or "delta"
    connected_at: dt.datetime
    machine: _Machine = field(repr=False)
    nack_log: dict[str, NackLog] = field(default_factory=dict, repr=False)

    def statuses(self) -> dict[str, st.WatchState]:
        return self.machine.statuses()

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "peer": self.peer,
            "node": self.node.id,
            "cluster": self.node.cluster,
            "protocol": self.protocol,
            "connected_at": self.connected_at.isoformat(),
            "types": {short_name(t): w.as_dict() for t, w in sorted(self.statuses().items())},
        }


class XdsMetrics:
    """Istio-named series (pilot/pkg/xds/monitoring.go)."""

    def __init__(self, registry: Registry) -> None:
        self.pushes = registry.counter("pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds.")
        self.rejects = registry.counter(
            "pilot_total_xds_rejects", "Total number of XDS responses from pilot rejected by proxy."
        )
        self.expired_nonce = registry.counter(
            "pilot_xds_expired_nonce", "Total number of XDS requests with an expired nonce."
        )
        self.connections = registry.gauge("pilot_xds", "Number of endpoints connected to this pilot using XDS.")
        self.convergence = registry.histogram(
            "pilot_proxy_convergence_time",
            "Delay in seconds between config change and a proxy receiving all required configuration.",
            [0.1, 0.5, 1, 3, 5, 10, 20, 30],
        )
        self.push_time = registry.histogram(
            "pilot_xds_push_time",
            "Total time in seconds to build and send one xDS response to a proxy.",
            [0.01, 0.1, 1, 3, 5, 10, 20, 30],
        )
        self.suppressed_logs = registry.counter(
            "ztd_xds_suppressed_logs", "Log lines left out because a client repeated itself (NACKs), by type."
        )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_EOF = object()


class XdsStreams:
    """The gRPC side of the engine; servicers delegate their streaming methods here."""

    def __init__(
        self,
        cache: SnapshotCache,
        source: Source,
        *,
        metrics: XdsMetrics | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        control_plane: str = "",
        encoded_delta: bool = False,
    ) -> None:
        """`encoded_delta`: Delta responses are `EncodedDeltaResponse`s (pre-serialised resources joined as
        bytes); the servicer must then be registered with a serializer that calls `SerializeToString()`."""
        self._cache = cache
        self._source = source
        self._metrics = metrics
        self._clock = clock
        self._control_plane = control_plane
        self._encoded_delta = encoded_delta
        self._ids = itertools.count(1)
        self._streams: dict[str, StreamInfo] = {}

    def streams(self) -> list[StreamInfo]:
        return list(self._streams.values())

    async def sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any) -> None:
        await self._run(requests, context, "sotw")

    async def delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Any) -> None:
        await self._run(requests, context, "delta")

    async def _run(self, requests: AsyncIterator[Any], context: Any, protocol: str) -> None:
        peer = context.peer() or "unknown"
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration:
            return
        try:
            binding = await self._source.open_stream(first.node, peer)
        except SourceError as err:
            log.warning("xDS stream from %s (%s) refused: %s", peer, clip(first.node.id, NODE_ID_LIMIT), err.message)
            await context.abort(err.code, err.message)
            return
        view = self._cache.view(binding.scopes)
        machine: _Machine
        if protocol == "sotw":
            machine = SotwStream(view, control_plane=self._control_plane)
        else:
            machine = DeltaStream(view, control_plane=self._control_plane, encode=self._encoded_delta)
        queue: asyncio.Queue[object] = asyncio.Queue()
        queue.put_nowait(first)

        def on_change(change: Change) -> None:
            if view.sees(change):
                queue.put_nowait(change)

        stop_watch = self._cache.watch(on_change)
        stream_id = f"{clip(first.node.id, NODE_ID_LIMIT) or 'anonymous'}-{next(self._ids)}"
        info = StreamInfo(stream_id, peer, first.node, protocol, self._clock(), machine)
        self._streams[info.id] = info
        if self._metrics is not None:
            self._metrics.connections.set(len(self._streams))
        log.info("xDS %s stream %s connected from %s", protocol, info.id, peer)
        error: SourceError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._read(requests, queue, info, machine))
                error = await self._serve(info, machine, binding, queue, context)
                reader.cancel()
        finally:
            stop_watch()
            self._streams.pop(info.id, None)
            if self._metrics is not None:
                self._metrics.connections.set(len(self._streams))
            await binding.close()
            log.info("xDS %s stream %s closed", protocol, info.id)
        if error is not None:
            await context.abort(error.code, error.message)

    async def _read(
        self, requests: AsyncIterator[Any], queue: asyncio.Queue[object], info: StreamInfo, machine: _Machine
    ) -> None:
        try:
            async for req in requests:
                # An ACK with nothing queued ahead of it is handled here: it needs no write, and skipping the
                # queue saves a task switch per client per push. Anything else keeps its place in line.
                step = machine.handle_plain_ack(req, self._clock()) if queue.empty() else None
                if step is None:
                    queue.put_nowait(req)
                else:
                    self._log_step(info, step)
        finally:
            queue.put_nowait(_EOF)

    async def _serve(
        self, info: StreamInfo, machine: _Machine, binding: StreamBinding, queue: asyncio.Queue[object], context: Any
    ) -> SourceError | None:
        while True:
            item = await queue.get()
            if item is _EOF:
                return None
            now = self._clock()
            began = time.monotonic()
            if isinstance(item, Change):
                responses = machine.handle_change(item, now)
            else:
                step = machine.handle_request(item, now)
                self._log_step(info, step)
                try:
                    if step.subscribed:
                        await binding.subscribe(step.type_url, step.subscribed)
                    if step.unsubscribed:
                        await binding.unsubscribe(step.type_url, step.unsubscribed)
                except SourceError as err:
                    log.warning("xDS stream %s: %s", info.id, err.message)
                    return err
                responses = step.responses
            for resp in responses:
                await context.write(resp)
                if self._metrics is not None:
                    self._metrics.pushes.inc(type=short_name(resp.type_url).lower())
                    self._metrics.push_time.observe(time.monotonic() - began)
            if responses and isinstance(item, Change) and item.origin is not None and self._metrics is not None:
                self._metrics.convergence.observe(time.monotonic() - item.origin)

    def _log_step(self, info: StreamInfo, step: st.Step) -> None:
        kind = short_name(step.type_url)
        if step.event == st.NACK:
            # Keep the last good config. The detail (clipped) is the client's reason: one line per stream and
            # type and minute at most, so a client that NACKs in a loop cannot flood the log.
            if self._metrics is not None:
                self._metrics.rejects.inc(type=kind.lower())
            now = self._clock()
            seen = info.nack_log.setdefault(kind, NackLog())
            if seen.logged_at is not None and (now - seen.logged_at).total_seconds() < NACK_LOG_INTERVAL:
                seen.suppressed += 1
                if self._metrics is not None:
                    self._metrics.suppressed_logs.inc(type=kind.lower())
                return
            more = f" ({seen.suppressed} more NACKs of it since the last line)" if seen.suppressed else ""
            log.warning("xDS %s NACK from %s: %s%s", kind, info.id, step.detail, more)
            seen.logged_at, seen.suppressed = now, 0
        elif step.event == st.STALE_NONCE:
            log.debug("xDS %s stale request from %s: %s", kind, info.id, step.detail)
            if self._metrics is not None:
                self._metrics.expired_nonce.inc(type=kind.lower())
        elif log.isEnabledFor(logging.DEBUG):  # an ACK per stream per push: do not even build the arguments
            log.debug(
                "xDS %s %s from %s (+%s -%s)",
                kind,
                step.event,
                info.id,
                sorted(step.subscribed),
                sorted(step.unsubscribed),
            )
