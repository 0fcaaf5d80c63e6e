"""One list/watch loop for every Kubernetes collection we follow (the registry's kinds, the CA's Secrets).

An Informer lists (`on_replace(items, resourceVersion)`: the whole collection, so whatever changed while nobody
watched is accounted for), then watches from that resourceVersion with bookmarks, handing each ADDED / MODIFIED /
DELETED to `on_event(type, object)`. A watch that ends is resumed from the last resourceVersion seen (events or
bookmarks); one that expired (410 Gone, as an HTTP answer or as an ERROR event) is replaced by a fresh list. Other
errors retry with jittered exponential backoff, one warning per outage. A collection that is not served (the
list or watch call raises NotServed, e.g. a CRD that is not installed) counts as empty and is listed again later.

The `kubernetes` client is blocking: the calls run on the informer's own threads (one list or watch at a time,
plus room for an aborted watch still unwinding), and a watch's lines reach the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from ztcore.backoff import Backoff, Streak
from ztcore.kubeclient import describe_error

log = logging.getLogger(__name__)

Obj = dict[str, Any]  # a Kubernetes object as JSON
# Blocking: the whole collection (paged if it likes) and the list's resourceVersion.
ListFn = Callable[[], tuple[list[Obj], str]]
# Blocking: (resourceVersion, timeoutSeconds) -> the raw (`_preload_content=False`) watch response.
WatchFn = Callable[[str, int], Any]
OnReplace = Callable[[list[Obj], str], Awaitable[None] | None]
OnEvent = Callable[[str, Obj], Awaitable[None] | None]
OnSynced = Callable[[], Awaitable[None] | None]

WATCH_EVENTS = ("ADDED", "MODIFIED", "DELETED")
# A watch shorter than this was ended by the server at once (client-go's reflector: "very short watch").
SHORT_WATCH = 1.0


class NotServed(Exception):
    """Raised by a list or watch call: the server does not serve this collection (404 on every version)."""


@dataclass(frozen=True, slots=True)
class InformerStats:
    lists: int
    watches: int
    expired: int  # 410 Gone (each followed by a fresh list)
    errors: int
    resource_version: str  # "" while a list is due


class WatchStream:
    """One watch's hand-off between its thread and the loop, and the way to abort it from the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._lock = threading.Lock()
        self._resp: Any = None
        self._closed = False

    def put(self, item: object) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens any more
            return False
        return True

    def attach(self, resp: Any) -> bool:
        with self._lock:
            self._resp = resp
            return not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unblock the reading thread (shutting the socket down makes its recv() return at once) and the loop
        (a watch still connecting would otherwise never report)."""
        with self._lock:
            self._closed = True
            resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()
        self.put(_END)


class _Expired(Exception):
    """410 Gone: the resourceVersion is no longer in the API server's history; list again."""


_CONNECTED = object()
_END = object()


def _watch_blocking(watch: WatchFn, rv: str, timeout_s: int, stream: WatchStream) -> None:
    """Runs on an informer thread; every outcome (events, end, error) goes through the stream's queue."""
    resp: Any = None
    try:
        resp = watch(rv, timeout_s)
        if not stream.attach(resp):
            return
        stream.put(_CONNECTED)
        # One JSON event per line; a large object can span many chunks, so only the new bytes are searched.
        pending = bytearray()
        for chunk in resp.stream(amt=None, decode_content=False):
            searched = len(pending)
            pending += chunk
            while (end := pending.find(b"\n", searched)) >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                searched = 0
                if line.strip() and not stream.put(json.loads(line)):
                    return
        if pending.strip():
            stream.put(json.loads(bytes(pending)))
        stream.put(_END)
    except BaseException as err:  # handed to the loop, which decides (relist, backoff, or stop)
        stream.put(_END if stream.closed else err)
    finally:
        if resp is not None:
            # A watch connection is never reused: after a shutdown() it is half-closed.
            with contextlib.suppress(Exception):
                resp.close()


def _gone(err: BaseException) -> bool:
    return isinstance(err, ApiException) and err.status == 410


async def _call(callback: Callable[..., Awaitable[None] | None], *args: Any) -> None:
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


class Informer:
    """List, then watch, one collection until cancelled or closed. `sync()` lists once (for a startup that
    must fail when the API server is unusable); `run()` lists when needed, then watches."""

    def __init__(
        self,
        name: str,
        list_fn: ListFn,
        watch_fn: WatchFn,
        *,
        on_replace: OnReplace,
        on_event: OnEvent,
        on_synced: OnSynced | None = None,
        backoff: Backoff,
        watch_timeout: float = 300.0,
        not_served_recheck: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if watch_timeout <= 0 or not_served_recheck < 0:
            raise ValueError(
                f"informer {name}: watch_timeout must be > 0 and not_served_recheck >= 0, "
                f"got {watch_timeout} and {not_served_recheck}"
            )
        self.name = name  # in every log line: "watching {name} failed"
        self._list_fn = list_fn
        self._watch_fn = watch_fn
        self._on_replace = on_replace
        self._on_event = on_event
        self._on_synced = on_synced
        self._retry = Streak(backoff, rng)  # errors
        self._short = Streak(backoff, rng)  # watches the server ended at once
        self._watch_timeout = watch_timeout
        self._not_served_recheck = not_served_recheck
        self._clock = clock
        self._rng = rng
        self._rv: str | None = None  # None: list next
        self._served: bool | None = None  # unknown until the first list
        self._synced = False
        self._lists = self._watches = self._expired = self._errors = 0
        self._stream: WatchStream | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = asyncio.Event()

    @property
    def synced(self) -> bool:
        """True once a list went through (or found the collection not served)."""
        return self._synced

    @property
    def resource_version(self) -> str:
        return self._rv or ""

    def stats(self) -> InformerStats:
        return InformerStats(self._lists, self._watches, self._expired, self._errors, self.resource_version)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def sync(self) -> bool:
        """One list, handed to on_replace; False if the collection is not served (then empty). Errors are
        raised, not retried (a 410 as the ApiException it is)."""
        try:
            items, rv = await self._blocking(self._list_fn)
        except NotServed as err:
            await self._not_served(err)
            return False
        self._lists += 1
        await _call(self._on_replace, items, rv)
        self._served = True
        self._rv = rv
        await self._set_synced()
        return True

    async def run(self) -> None:
        """List (unless `sync()` did), watch and hand on the changes, until cancelled or closed."""
        while not self._closing.is_set():
            try:
                if self._rv is None:
                    if not await self.sync():
                        await self._sleep(self._not_served_recheck)
                        continue
                    self._recovered()
                await self._watch()
            except NotServed as err:
                await self._not_served(err)
                await self._sleep(self._not_served_recheck)
            except asyncio.CancelledError:
                # close() cancels a list still waiting for a thread: that ends run(), it is not a cancellation.
                task = asyncio.current_task()
                if self._closing.is_set() and (task is None or not task.cancelling()):
                    return
                raise
            except Exception as err:
                if self._closing.is_set():
                    return
                if _gone(err) or isinstance(err, _Expired):
                    self._expired += 1
                    self._rv = None
                    reason = str(err) if isinstance(err, _Expired) else describe_error(err)
                    log.info("%s watch expired (%s); listing again", self.name, reason)
                    continue
                self._errors += 1
                # One warning per outage; the retries that follow are debug noise until it recovers.
                level = logging.WARNING if self._retry.failures == 0 else logging.DEBUG
                delay = self._retry.next()
                log.log(level, "watching %s failed: %s; retrying in %.1fs", self.name, describe_error(err), delay)
                await self._sleep(delay)

    def close(self) -> None:
        """Abort the open watch, end `run()` and let the threads go; from the loop's thread, safe to call twice."""
        self._closing.set()
        if self._stream is not None:
            self._stream.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- internals -------------------------------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # One list or watch at a time, plus an aborted watch that may still be unwinding.
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"informer {self.name}")
        return self._executor

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    async def _sleep(self, delay: float) -> None:
        """A wait that close() cuts short."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closing.wait()

    async def _set_synced(self) -> None:
        if not self._synced:
            self._synced = True
            if self._on_synced is not None:
                await _call(self._on_synced)

    async def _not_served(self, err: NotServed) -> None:
        if self._served is not False:  # said once, when it stops being served (or never was)
            log.info("%s: %s; treating it as empty", self.name, err)
        self._served = False
        self._rv = None
        await _call(self._on_replace, [], "")
        await self._set_synced()

    def _recovered(self) -> None:
        failures = self._retry.reset()
        if failures:
            log.info("watching %s again after %d failed attempt(s)", self.name, failures)

    async def _watch(self) -> None:
        """One watch call, from the current resourceVersion, until the server ends it."""
        assert self._rv is not None
        loop = asyncio.get_running_loop()
        stream = WatchStream(loop)
        # Spread the renewals as client-go's reflector does: a timeout between 1x and 2x the base.
        timeout_s = max(1, int(self._watch_timeout * (self._rng or random).uniform(1.0, 2.0)))
        self._stream = stream
        started = self._clock()
        fut = loop.run_in_executor(self._pool(), _watch_blocking, self._watch_fn, self._rv, timeout_s, stream)
        self._watches += 1
        try:
            while True:
                item = await stream.queue.get()
                if item is _CONNECTED:
                    self._recovered()
                elif item is _END:
                    break
                elif isinstance(item, BaseException):
                    raise item
                elif isinstance(item, dict):
                    await self._handle(item)
                else:
                    raise ValueError(f"watch line is not an object: {item!r:.80}")
        finally:
            stream.close()
            if self._stream is stream:
                self._stream = None
            fut.add_done_callback(_discard_result)
        if self._clock() - started < SHORT_WATCH:
            # A server that ends every watch at once must not be hammered: the waits double until one lasts.
            await self._sleep(self._short.next(failure=False))
        else:
            self._short.reset()

    async def _handle(self, event: Obj) -> None:
        etype = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event {etype!r} without an object")
        if etype == "ERROR":  # a Status
            if obj.get("code") == 410:
                raise _Expired(str(obj.get("message") or "Gone"))
            raise RuntimeError(f"watch error {obj.get('code')} {obj.get('reason', '')}: {obj.get('message', '')}")
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if etype == "BOOKMARK":
            self._rv = rv or self._rv
            return
        if etype not in WATCH_EVENTS:
            raise ValueError(f"unknown watch event type {etype!r}")
        await _call(self._on_event, etype, obj)
        # Only once handled: an event whose callback failed is delivered again by the next watch.
        if rv:
            self._rv = rv


def _discard_result(fut: asyncio.Future[Any]) -> None:
    # The thread reports through the queue; its future only needs collecting.
    if not fut.cancelled():
        fut.exception()
