"""The one list/watch loop (ztcore.informer) driven by fake list and watch calls: relists on 410 (HTTP or ERROR
event), bookmarks, backoff and recovery, servers that end watches at once, and close while watching."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.support.wait import eventually
from ztcore.backoff import Backoff
from ztcore.informer import Informer, NotServed, Obj

FAST = Backoff(0.01, 0.05)
_SHUT = object()
_EOF = object()


def obj(name: str, rv: str) -> Obj:
    return {"metadata": {"name": name, "resourceVersion": rv}}


def event(etype: str, body: Obj) -> bytes:
    return json.dumps({"type": etype, "object": body}).encode() + b"\n"


class FakeWatch:
    """A raw watch response: chunks fed by the test, held open until ended or shut down (as a socket is)."""

    def __init__(self, *chunks: bytes, end: bool = True) -> None:
        self._chunks: queue.Queue[object] = queue.Queue()
        for chunk in chunks:
            self._chunks.put(chunk)
        if end:
            self._chunks.put(_EOF)
        self.shut = threading.Event()
        self.closed = threading.Event()

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        while True:
            chunk = self._chunks.get()
            if chunk is _EOF:
                return
            if chunk is _SHUT:
                raise ConnectionResetError("connection shut down")
            assert isinstance(chunk, bytes)
            yield chunk

    def shutdown(self) -> None:
        self.shut.set()
        self._chunks.put(_SHUT)

    def close(self) -> None:
        self.closed.set()


class FakeServer:
    """Scripted answers: each list or watch call takes the next one (an exception is raised). With no script
    left, a list is empty and a watch stays open, idle."""

    def __init__(self) -> None:
        self.lists: deque[tuple[list[Obj], str] | BaseException] = deque()
        self.watches: deque[FakeWatch | BaseException] = deque()
        self.list_calls = 0
        self.watch_calls: list[tuple[str, int, float]] = []  # (resourceVersion, timeoutSeconds, when)
        self.opened: list[FakeWatch] = []
        self._lock = threading.Lock()

    def list(self) -> tuple[list[Obj], str]:
        with self._lock:
            self.list_calls += 1
            answer = self.lists.popleft() if self.lists else ([], "1")
        if isinstance(answer, BaseException):
            raise answer
        items, rv = answer
        return [dict(i) for i in items], rv

    def watch(self, rv: str, timeout_s: int) -> FakeWatch:
        with self._lock:
            self.watch_calls.append((rv, timeout_s, time.monotonic()))
            answer = self.watches.popleft() if self.watches else FakeWatch(end=False)
        if isinstance(answer, BaseException):
            raise answer
        self.opened.append(answer)
        return answer


class Recorder:
    def __init__(self) -> None:
        self.replaced: list[tuple[list[str], str]] = []
        self.events: list[tuple[str, str]] = []
        self.synced = 0
        self.fail_next_event = False

    def on_replace(self, items: list[Obj], rv: str) -> None:
        self.replaced.append(([i["metadata"]["name"] for i in items], rv))

    async def on_event(self, etype: str, body: Obj) -> None:  # async callbacks are awaited
        if self.fail_next_event:
            self.fail_next_event = False
            raise RuntimeError("consumer failed")
        self.events.append((etype, body["metadata"]["name"]))

    def on_synced(self) -> None:
        self.synced += 1


def make(server: FakeServer, rec: Recorder, **options: Any) -> Informer:
    settings: dict[str, Any] = {"backoff": FAST, "watch_timeout": 10.0, "not_served_recheck": 0.05, **options}
    return Informer(
        "things",
        server.list,
        server.watch,
        on_replace=rec.on_replace,
        on_event=rec.on_event,
        on_synced=rec.on_synced,
        **settings,
    )


@contextlib.asynccontextmanager
async def running(informer: Informer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(informer.run())
    try:
        yield task
    finally:
        informer.close()
        await asyncio.wait_for(task, 5)


async def test_lists_then_watches_from_the_lists_version_and_hands_on_events() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(([obj("a", "5")], "10"))
    # The second event is split across chunks, and the last one ends with the stream, without a newline.
    modified = event("MODIFIED", obj("a", "12"))
    server.watches.append(
        FakeWatch(
            event("ADDED", obj("b", "11")) + modified[:20],
            modified[20:],
            event("DELETED", obj("b", "13")).rstrip(b"\n"),
        )
    )
    informer = make(server, rec)
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) == 2, within=5, what="the resumed watch")
        assert rec.replaced == [(["a"], "10")]
        assert rec.events == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        assert informer.resource_version == "13" and informer.synced and rec.synced == 1
        (rv, timeout_s, _), (resumed_rv, _, _) = server.watch_calls
        assert rv == "10" and 10 <= timeout_s <= 20  # jittered like client-go's reflector: 1x to 2x
        assert resumed_rv == "13"  # the ended watch resumes from its last event, without a list
        stats = informer.stats()
        assert (stats.lists, stats.watches, stats.expired, stats.errors) == (1, 2, 0, 0)


async def test_410_answer_to_a_watch_relists_and_watches_from_the_new_version(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ztcore.informer")
    server, rec = FakeServer(), Recorder()
    server.lists.extend([([obj("a", "5")], "10"), ([obj("c", "60")], "60")])
    server.watches.extend([FakeWatch(event("ADDED", obj("b", "11"))), ApiException(status=410, reason="Gone")])
    informer = make(server, rec)
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) == 3, within=5, what="the watch after the relist")
        # The watch that ended resumed from its last event; the expired one was replaced by a list.
        assert [c[0] for c in server.watch_calls] == ["10", "11", "60"]
        assert rec.replaced == [(["a"], "10"), (["c"], "60")]
        stats = informer.stats()
        assert (stats.lists, stats.expired, stats.errors) == (2, 1, 0)
    assert "things watch expired (HTTP 410 Gone); listing again" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_error_event_410_relists() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.extend([([], "10"), ([obj("fresh", "90")], "90")])
    status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 10 (80)"}
    server.watches.append(FakeWatch(event("ERROR", status), end=False))  # the server keeps it open after
    informer = make(server, rec)
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) == 2, within=5, what="the watch after the relist")
        assert server.watch_calls[1][0] == "90" and rec.replaced[-1] == (["fresh"], "90")
        assert informer.stats().expired == 1 and informer.stats().errors == 0
        # The expired watch was aborted, not left reading.
        await eventually(lambda: server.opened[0].shut.is_set() and server.opened[0].closed.is_set(), within=5)


async def test_bookmark_moves_the_resource_version_without_an_event() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(([], "10"))
    server.watches.append(FakeWatch(event("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "77"}})))
    informer = make(server, rec)
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) == 2, within=5, what="the resumed watch")
        assert server.watch_calls[1][0] == "77" and rec.events == []
        assert informer.stats().lists == 1  # resumed, not relisted


async def test_errors_back_off_with_one_warning_then_recover(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ztcore.informer")
    server, rec = FakeServer(), Recorder()
    server.lists.append(([], "10"))
    server.watches.extend([ConnectionRefusedError("refused"), ConnectionRefusedError("refused")])
    informer = make(server, rec, backoff=Backoff(0.05, 1.0))
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) == 3 and server.opened, within=5, what="a third watch")
        await eventually(lambda: "watching things again after 2 failed attempt(s)" in caplog.text, within=5)
        times = [c[2] for c in server.watch_calls]
        # 0.05 s then 0.1 s: each retry waits twice as long as the one before.
        assert times[1] - times[0] >= 0.05 and times[2] - times[1] >= 0.1
        assert [c[0] for c in server.watch_calls] == ["10", "10", "10"]
        assert informer.stats().errors == 2 and informer.stats().lists == 1
    failures = [r for r in caplog.records if "watching things failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG]  # one warning per outage
    assert "ConnectionRefusedError: refused; retrying in" in failures[0].getMessage()


async def test_a_server_ending_every_watch_at_once_is_not_hammered() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(([], "10"))
    server.watches.extend(FakeWatch() for _ in range(20))  # each ends as soon as it starts
    informer = make(server, rec, backoff=Backoff(0.02, 10.0))
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) >= 5, within=5, what="five watches")
        times = [c[2] for c in server.watch_calls[:5]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, wait in zip(gaps, (0.02, 0.04, 0.08, 0.16), strict=True):
            assert gap >= wait, gaps
        assert informer.stats().errors == 0 and informer.stats().lists == 1


async def test_close_while_watching_ends_run_and_shuts_the_socket(caplog: pytest.LogCaptureFixture) -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(([], "10"))
    informer = make(server, rec)
    task = asyncio.create_task(informer.run())
    await eventually(lambda: server.opened, within=5, what="an open watch")
    informer.close()
    await asyncio.wait_for(task, 5)  # returns: run() ends, it is not cancelled
    assert not task.cancelled()
    watch = server.opened[0]
    await eventually(lambda: watch.shut.is_set() and watch.closed.is_set(), within=5, what="socket shut, closed")
    assert informer.stats().errors == 0 and len(server.watch_calls) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    informer.close()  # twice is fine


async def test_close_while_a_watch_is_still_connecting_ends_run() -> None:
    server, rec = FakeServer(), Recorder()
    release = threading.Event()
    connecting = threading.Event()

    def slow_watch(rv: str, timeout_s: int) -> FakeWatch:
        connecting.set()
        release.wait(10)  # a connect that hangs: there is no socket to shut down yet
        return server.watch(rv, timeout_s)

    informer = Informer(
        "things", server.list, slow_watch, on_replace=rec.on_replace, on_event=rec.on_event, backoff=FAST
    )
    task = asyncio.create_task(informer.run())
    try:
        await eventually(connecting.is_set, within=5, what="the watch call")
        informer.close()
        await asyncio.wait_for(task, 2)
    finally:
        release.set()
    # Once it connects after all, the watch is dropped at once.
    await eventually(lambda: server.opened and server.opened[0].closed.is_set(), within=5, what="the late watch")
    assert informer.stats().errors == 0


async def test_close_while_backing_off_ends_run_at_once() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(RuntimeError("down"))
    informer = make(server, rec, backoff=Backoff(30.0, 60.0))
    task = asyncio.create_task(informer.run())
    await eventually(lambda: informer.stats().errors == 1, within=5, what="the failed list")
    informer.close()
    await asyncio.wait_for(task, 2)  # not after the 30 s wait
    assert not informer.synced and rec.replaced == []


async def test_not_served_counts_as_empty_and_is_listed_again_later(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ztcore.informer")
    server, rec = FakeServer(), Recorder()
    server.lists.extend([NotServed("no such CRD"), NotServed("no such CRD"), ([obj("p", "3")], "3")])
    informer = make(server, rec)
    async with running(informer):
        await eventually(lambda: server.watch_calls, within=5, what="a watch once it is served")
        assert rec.replaced == [([], ""), ([], ""), (["p"], "3")] and rec.synced == 1
        assert server.watch_calls[0][0] == "3"
    # Said once, not at every recheck.
    assert caplog.text.count("things: no such CRD; treating it as empty") == 1


async def test_a_failed_event_is_retried_from_the_last_version_handled() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(([], "10"))
    server.watches.append(FakeWatch(event("ADDED", obj("a", "11")), event("ADDED", obj("b", "12")), end=False))
    server.watches.append(FakeWatch(event("ADDED", obj("b", "12")), end=False))
    informer = make(server, rec)
    rec.fail_next_event = True
    async with running(informer):
        await eventually(lambda: rec.events == [("ADDED", "b")], within=5, what="the redelivered event")
        assert server.watch_calls[1][0] == "10" and informer.stats().errors == 1
        assert informer.resource_version == "12"


async def test_unknown_event_type_and_eventless_line_are_errors() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(([], "10"))
    server.watches.append(FakeWatch(event("SURPRISE", obj("a", "11"))))
    server.watches.append(FakeWatch(json.dumps({"type": "ADDED"}).encode() + b"\n"))
    informer = make(server, rec)
    async with running(informer):
        await eventually(lambda: len(server.watch_calls) == 3, within=5, what="a third watch")
        assert informer.stats().errors == 2 and rec.events == []


async def test_sync_raises_list_errors_for_the_caller_to_decide() -> None:
    server, rec = FakeServer(), Recorder()
    server.lists.append(ApiException(status=403, reason="Forbidden"))
    informer = make(server, rec)
    with pytest.raises(ApiException):
        await informer.sync()
    assert not informer.synced and informer.stats().lists == 0
    assert await informer.sync() and informer.synced
    informer.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="informer things: watch_timeout must be > 0"):
        make(FakeServer(), Recorder(), watch_timeout=0)
