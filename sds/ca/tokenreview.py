"""The real `TokenReviewer`: Kubernetes' TokenReview API, as istiod's KubeJWTAuthenticator calls it.

The API server checks the token's signature, expiry, audience and (for bound tokens) that the pod or node
it is bound to still exists with the same UID. `KubeJwtAuthenticator` (authn.py) reads the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from ztcore.authn import TokenReviewStatus
from ztcore.kubeclient import json_body


class TokenReviewError(Exception):
    """The review could not be made (API server down, forbidden); never carries the token."""


def review_status(body: Mapping[str, Any], audiences: Sequence[str]) -> TokenReviewStatus:
    """A TokenReview response (JSON) -> TokenReviewStatus. Pure.

    When audiences were asked for, the API server answers with the ones the token matched; a reviewer that
    asks must check that one of them came back (the TokenReview API's own advice), so a server that ignores
    spec.audiences cannot make a token for another audience pass.
    """
    status = body.get("status") or {}
    if not isinstance(status, Mapping):
        return TokenReviewStatus(authenticated=False, error="TokenReview response has no status")
    user = status.get("user") or {}
    if not isinstance(user, Mapping):
        user = {}
    extra_raw = user.get("extra") or {}
    extra = {
        str(k): tuple(str(v) for v in values)
        for k, values in (extra_raw.items() if isinstance(extra_raw, Mapping) else ())
        if isinstance(values, list)
    }
    matched = tuple(str(a) for a in status.get("audiences") or ())
    authenticated = status.get("authenticated") is True
    error = str(status.get("error") or "")
    if authenticated and audiences and not set(matched) & set(audiences):
        authenticated = False
        error = error or f"the review matched audiences {list(matched)}, none of {list(audiences)}"
    return TokenReviewStatus(
        authenticated=authenticated,
        username=str(user.get("username") or ""),
        groups=tuple(str(g) for g in user.get("groups") or ()),
        extra=extra,
        audiences=matched,
        error=error,
    )


class KubeTokenReviewer:
    """Implements ztcore.authn.TokenReviewer with a `kubernetes.client.ApiClient` (blocking: run on a thread)."""

    def __init__(self, api: Any, *, timeout: float = 10.0) -> None:
        self._api = api
        self._timeout = timeout

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewStatus:
        return await asyncio.to_thread(self._review, token, tuple(audiences))

    def _review(self, token: str, audiences: tuple[str, ...]) -> TokenReviewStatus:
        body = kubernetes.client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=list(audiences) or None),
        )
        try:
            # Raw JSON: the answer echoes the token in spec, so nothing of it may end up in an error or log.
            resp: Any = kubernetes.client.AuthenticationV1Api(self._api).create_token_review(
                body, _preload_content=False, _request_timeout=self._timeout
            )
            data = json_body(resp)
        except ApiException as err:
            raise TokenReviewError(f"HTTP {err.status} {err.reason or ''}".rstrip() + _status_message(err)) from None
        except ValueError as err:
            raise TokenReviewError(f"unreadable TokenReview response: {err}") from None
        except Exception as err:  # urllib3 connection errors name the URL, never the request body
            raise TokenReviewError(f"{type(err).__name__}: {err}") from None
        if not isinstance(data, Mapping):
            raise TokenReviewError("TokenReview response is not an object")
        return review_status(data, audiences)


def _status_message(err: ApiException) -> str:
    try:
        message = json.loads(err.body or "").get("message", "")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if message else ""
