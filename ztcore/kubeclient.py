"""Pieces every Kubernetes client of ours shares (informers, TokenReviews, the root ConfigMaps): a one-line
rendering of API errors and reading a raw (`_preload_content=False`) answer. The list/watch loop itself is
`ztcore.informer`."""

from __future__ import annotations

import contextlib
import json
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
