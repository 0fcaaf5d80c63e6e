"""Pieces every Kubernetes client of ours shares (the registry's watches, the CA's Secret watches): a one-line
rendering of API errors, reading a raw (`_preload_content=False`) answer, and the hand-off of a blocking watch
running on its own thread to the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException


def describe_error(err: BaseException) -> str:
    """One line for the log: the API server's Status message rather than ApiException's header dump."""
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        return describe_error(err.reason)  # the cause, without the full URL of every retry
    if isinstance(err, ApiException):
        message = ""
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            body = json.loads(err.body or "")
            message = str(body.get("message", ""))
        return f"HTTP {err.status} {err.reason or ''}".rstrip() + (f": {message}" if message else "")
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text


def json_body(resp: Any) -> Any:
    """The JSON of a raw answer (`_preload_content=False`: no model objects built), its connection handed back to
    the pool whatever happens. ValueError if it is not JSON."""
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


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
        """Unblock the reading thread: shutting the socket down makes its recv() return at once."""
        with self._lock:
            self._closed = True
            resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()
