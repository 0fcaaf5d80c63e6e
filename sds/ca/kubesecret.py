"""CA material from Kubernetes Secrets in ztd's namespace, kept as istiod keeps it.

- `cacerts`: a plugged-in CA (Istio's keys ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem, or
  tls.crt/tls.key/ca.crt). Used whenever it exists, validated by the same loader as a `cacerts` folder.
- else `istio-ca-secret` (type istio.io/ca-root, the same four keys): the self-signed root. Only the
  ztd-leader Lease holder creates it, and only with a create (never an overwrite): a 409 means another
  replica won the race, and its Secret is read instead, so replicas always end up with one root. Others
  wait for it, for a bounded time.

Both Secrets are watched (list, then watch by metadata.name). A change (a rotated plug-in CA, a new root)
is validated and swaps the whole CAMaterial; an invalid one is refused with a warning and the current
material stays. If istio-ca-secret is deleted while we sign with it, the leader writes it back from memory
(`keep_ca_secret`), so the root never silently changes; and the leader re-issues the self-signed root with
the same key before it expires (`rotate_root`). Keys are never logged; errors name Secret keys, never their
content.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from sds.ca import keyring
from sds.ca.keyring import CAError, CAMaterial
from ztcore.backoff import Backoff
from ztcore.informer import Informer, Obj
from ztcore.kubeclient import describe_error, json_body
from ztcore.lease import LEASE_NAME

log = logging.getLogger(__name__)

# Object names and a type, not credentials.
CACERTS_SECRET = "cacerts"  # noqa: S105
CA_SECRET = "istio-ca-secret"  # noqa: S105
CA_SECRET_TYPE = "istio.io/ca-root"  # noqa: S105
SECRET_NAMES = (CACERTS_SECRET, CA_SECRET)

Secret = Mapping[str, Any]  # a Secret as JSON


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- pure ----------------------------------------------------------------------------------------------------


def secret_label(secret: Secret) -> str:
    meta = secret.get("metadata") or {}
    return f"Secret {meta.get('namespace', '')}/{meta.get('name', '')}"


def secret_items(secret: Secret) -> dict[str, bytes]:
    """The Secret's data, base64-decoded (stringData is never returned by the API server)."""
    label = secret_label(secret)
    out: dict[str, bytes] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise CAError(f"{label} key {key} is not base64") from None
    return out


def material_from_secret(secret: Secret, now: dt.datetime) -> CAMaterial:
    """Validated CA material from a Secret in Istio's layout (the rules of keyring.load_cacerts)."""
    label = secret_label(secret)
    return keyring.load_material(secret_items(secret), label, now, label=lambda key: f"{label} key {key}")


def ca_secret_body(material: CAMaterial, namespace: str) -> dict[str, Any]:
    """istio-ca-secret as istiod writes it. Holds the private key: never log it."""
    data = {k: base64.b64encode(v).decode() for k, v in keyring.material_items(material).items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET, "namespace": namespace},
        "type": CA_SECRET_TYPE,
        "data": data,
    }


def fingerprint(secret: Secret | None) -> str:
    """Changes exactly when the Secret's name or data change (metadata-only updates do not count)."""
    if secret is None:
        return ""
    digest = hashlib.sha256((secret.get("metadata") or {}).get("name", "").encode())
    for key, value in sorted((secret.get("data") or {}).items()):
        digest.update(b"\0" + str(key).encode() + b"\0" + str(value).encode())
    return digest.hexdigest()


def choose(seen: Mapping[str, Secret | None]) -> str | None:
    """Which Secret to sign with: cacerts if it exists, else istio-ca-secret; None while neither is known
    to exist (a name missing from `seen` has not been read yet)."""
    if seen.get(CACERTS_SECRET) is not None:
        return CACERTS_SECRET
    if CACERTS_SECRET in seen and seen.get(CA_SECRET) is not None:
        return CA_SECRET
    return None


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...

    @property
    def holder(self) -> str: ...

    @property
    def last_error(self) -> str: ...

    async def wait_leading(self) -> None: ...


# --- the source ----------------------------------------------------------------------------------------------


class KubeCASource:
    """`load_initial()` once at startup, then `run()` (watches) for the process lifetime, and
    `keep_ca_secret()` as a leader duty. `material` is always the current, validated CAMaterial."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        leadership: Leadership,
        *,
        algorithm: str,
        trust_domain: str,
        self_signed_ttl: dt.timedelta,
        wait_timeout: float = 60.0,
        poll: float = 1.0,
        retry: float = 1.0,
        request_timeout: float = 10.0,
        watch_timeout: float = 300.0,
        on_change: Callable[[CAMaterial], Awaitable[None]] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._api = api
        self.namespace = namespace
        self._leadership = leadership
        self._algorithm = algorithm
        self._trust_domain = trust_domain
        self._ttl = self_signed_ttl
        self._wait_timeout = wait_timeout
        self._poll = poll
        self._retry = retry
        self._request_timeout = request_timeout
        self.on_change = on_change
        self._clock = clock
        self._seen: dict[str, Secret | None] = {}
        self._material: CAMaterial | None = None
        self._fingerprint = ""
        self._rejected = ""
        self.active = ""  # the Secret the material came from
        self.swaps = 0
        self.created = False  # this replica created istio-ca-secret
        self.rotations = 0  # roots this replica re-issued as leader
        self.rotation_checks = 0  # leader passes over the root's expiry (each may rotate it)
        self.refusals = 0  # Secret versions refused as CA material
        self._changed = asyncio.Event()
        # doubling five times at most, and never past 30 s
        backoff = Backoff(min(retry, 30.0), min(retry * 32, 30.0), jitter=(0.8, 1.2))
        self._informers = [self._informer(name, backoff, watch_timeout) for name in SECRET_NAMES]

    @property
    def material(self) -> CAMaterial:
        if self._material is None:
            raise CAError("CA material not loaded yet")
        return self._material

    # --- blocking calls (threads) ---------------------------------------------------------------------------

    def _core(self) -> Any:
        return kubernetes.client.CoreV1Api(self._api)

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self._core().read_namespaced_secret(
                name, self.namespace, _preload_content=False, _request_timeout=self._request_timeout
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(json_body(resp))

    def _create(self, body: dict[str, Any]) -> bool:
        """True if we created it; False if it already existed (409)."""
        meta = body["metadata"]
        secret = kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(name=meta["name"], namespace=meta["namespace"]),
            type=body["type"],
            data=body["data"],
        )
        try:
            self._core().create_namespaced_secret(self.namespace, secret, _request_timeout=self._request_timeout)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def _replace(self, body: dict[str, Any], resource_version: str) -> bool:
        """True if replaced; False if the Secret changed since `resource_version` was read (409)."""
        meta = body["metadata"]
        secret = kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(
                name=meta["name"], namespace=meta["namespace"], resource_version=resource_version
            ),
            type=body["type"],
            data=body["data"],
        )
        try:
            self._core().replace_namespaced_secret(
                meta["name"], self.namespace, secret, _request_timeout=self._request_timeout
            )
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def _list(self, name: str) -> tuple[list[Obj], str]:
        resp = self._core().list_namespaced_secret(
            self.namespace,
            field_selector=f"metadata.name={name}",
            _preload_content=False,
            _request_timeout=self._request_timeout,
        )
        body = json_body(resp)
        items = [dict(item) for item in body.get("items") or ()]
        return items, str((body.get("metadata") or {}).get("resourceVersion", ""))

    def _watch_call(self, name: str, rv: str, timeout_s: int) -> Any:
        return self._core().list_namespaced_secret(
            self.namespace,
            field_selector=f"metadata.name={name}",
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _preload_content=False,
            _request_timeout=(10.0, timeout_s + 30.0),
        )

    # --- startup ----------------------------------------------------------------------------------------------

    async def load_initial(self) -> CAMaterial:
        """cacerts, else istio-ca-secret, else (as Lease holder) create istio-ca-secret; a follower waits for it
        up to `wait_timeout` seconds, then fails with one line."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_timeout
        last_error = ""
        while True:
            try:
                for name in SECRET_NAMES:
                    self._seen[name] = await asyncio.to_thread(self._get, name)
                chosen = choose(self._seen)
                if chosen is not None:
                    self._use(chosen, material_from_secret(self._secret(chosen), self._clock()))
                    return self.material
                if self._leadership.is_leader:
                    material = await asyncio.to_thread(
                        keyring.create_self_signed, self._algorithm, self._trust_domain, self._ttl, self._clock()
                    )
                    body = ca_secret_body(material, self.namespace)
                    if await asyncio.to_thread(self._create, body):
                        self.created = True
                        self._seen[CA_SECRET] = body
                        self._use(CA_SECRET, dataclass_source(material, secret_label(body)))
                        return self.material
                    log.info("Secret %s/%s was created by another replica; using it", self.namespace, CA_SECRET)
                    continue
            except CAError:
                raise
            except Exception as err:  # API trouble: retried until the deadline
                last_error = describe_error(err)
                log.debug("reading the CA Secrets failed: %s", last_error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CAError(self._timeout_message(last_error))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self._poll, remaining)):
                    if not self._leadership.is_leader:
                        await self._leadership.wait_leading()
                    else:
                        await asyncio.sleep(self._poll)

    def _timeout_message(self, last_error: str) -> str:
        ns = self.namespace
        holder = self._leadership.holder or "none"
        text = (
            f"no CA material after {self._wait_timeout:g}s: neither Secret {ns}/{CACERTS_SECRET} nor {ns}/{CA_SECRET} "
            f"exists, and only the holder of Lease {ns}/{LEASE_NAME} creates {CA_SECRET} (holder: {holder})"
        )
        lease_error = self._leadership.last_error
        if last_error:
            text += f"; Secret API: {last_error}"
        if lease_error:
            text += f"; Lease: {lease_error}"
        return text

    def _secret(self, name: str) -> Secret:
        secret = self._seen.get(name)
        assert secret is not None
        return secret

    def _use(self, name: str, material: CAMaterial) -> None:
        self._material = material
        self._fingerprint = fingerprint(self._seen.get(name))
        self.active = name
        log.info(
            "CA material from Secret %s/%s: signing cert %s, root(s) valid until %s",
            self.namespace,
            name,
            material.signing_cert.subject.rfc4514_string(),
            material.root_not_after.isoformat(),
        )

    # --- watching ---------------------------------------------------------------------------------------------

    def _informer(self, name: str, backoff: Backoff, watch_timeout: float) -> Informer:
        """List, then watch, one Secret by name (a field selector: the RBAC needs nothing wider)."""

        async def on_replace(items: list[Obj], _rv: str) -> None:
            await self._apply(name, self._in_namespace(items[0]) if items else None)

        async def on_event(etype: str, obj: Obj) -> None:
            await self._apply(name, None if etype == "DELETED" else self._in_namespace(obj))

        return Informer(
            f"Secret {self.namespace}/{name}",
            lambda: self._list(name),
            lambda rv, timeout_s: self._watch_call(name, rv, timeout_s),
            on_replace=on_replace,
            on_event=on_event,
            backoff=backoff,
            watch_timeout=watch_timeout,
        )

    def _in_namespace(self, secret: Obj) -> Obj:
        # List items and watch objects may omit it; secret_label names the Secret by it.
        secret.setdefault("metadata", {}).setdefault("namespace", self.namespace)
        return secret

    async def run(self) -> None:
        """Watch both Secrets until cancelled; swaps the material (and calls on_change) when they change."""
        try:
            async with asyncio.TaskGroup() as tg:
                for informer in self._informers:
                    tg.create_task(informer.run())
        finally:
            self.close()

    def close(self) -> None:
        for informer in self._informers:
            informer.close()

    async def _apply(self, name: str, secret: Secret | None) -> None:
        self._seen[name] = secret
        self._changed.set()
        await self._reconcile()

    async def _reconcile(self) -> None:
        chosen = choose(self._seen)
        if chosen is None:
            if self.active and self._seen.get(self.active, {}) is None:
                log.warning(
                    "Secret %s/%s is gone; still signing with the material in memory", self.namespace, self.active
                )
            return
        fp = fingerprint(self._seen.get(chosen))
        if fp in (self._fingerprint, self._rejected):
            return
        try:
            material = material_from_secret(self._secret(chosen), self._clock())
        except CAError as err:
            self._rejected = fp
            self.refusals += 1
            log.warning("refusing the new CA material: %s; still signing with %s", err, self.material.source)
            return
        self._use(chosen, material)
        self.swaps += 1
        if self.on_change is not None:
            await self.on_change(material)

    # --- leader duty -------------------------------------------------------------------------------------------

    async def keep_ca_secret(self) -> None:
        """Leader duty: while we sign with the self-signed root and istio-ca-secret is deleted, write it back
        from memory (create only), so replicas and a restarted ztd keep the same root."""
        while True:
            self._changed.clear()
            gone = (
                self.active == CA_SECRET
                and CACERTS_SECRET in self._seen
                and self._seen[CACERTS_SECRET] is None
                and CA_SECRET in self._seen
                and self._seen[CA_SECRET] is None
            )
            if gone:
                body = ca_secret_body(self.material, self.namespace)
                try:
                    if await asyncio.to_thread(self._create, body):
                        log.info("restored the deleted Secret %s/%s from memory", self.namespace, CA_SECRET)
                except Exception as err:
                    log.warning("restoring Secret %s/%s failed: %s", self.namespace, CA_SECRET, describe_error(err))
                    await asyncio.sleep(self._retry)
                    continue
            await self._changed.wait()

    async def rotate_root(self, *, check_interval: float, grace_percentile: int) -> None:
        """Leader duty: re-issue the self-signed root (same key) before it expires, as istiod's root rotator.

        The new root goes into istio-ca-secret with an update from the version read (a concurrent change
        wins and is re-checked next time); every replica, this one included, swaps through its watch.
        """
        while True:
            material = self._material
            secret = self._seen.get(CA_SECRET)
            now = self._clock()
            if (
                self.active == CA_SECRET
                and material is not None
                and secret is not None
                and keyring.is_self_signed_root(material)
                and keyring.root_rotation_due(material.signing_cert, now, grace_percentile)
            ):
                new = await asyncio.to_thread(keyring.reissue_root, material, self._ttl, now)
                version = str((secret.get("metadata") or {}).get("resourceVersion", ""))
                try:
                    if await asyncio.to_thread(self._replace, ca_secret_body(new, self.namespace), version):
                        self.rotations += 1
                        log.info(
                            "rotated the self-signed root in Secret %s/%s (same key): valid until %s, was %s",
                            self.namespace,
                            CA_SECRET,
                            new.not_after.isoformat(),
                            material.not_after.isoformat(),
                        )
                    else:
                        log.info(
                            "Secret %s/%s changed meanwhile; root rotation re-checked later", self.namespace, CA_SECRET
                        )
                except Exception as err:
                    log.warning("root rotation failed: %s", describe_error(err))
            self.rotation_checks += 1
            await asyncio.sleep(check_interval)


def dataclass_source(material: CAMaterial, source: str) -> CAMaterial:
    """The same material, naming where it is kept."""
    return CAMaterial(material.signing_cert, material.signing_key, material.chain, material.roots, source=source)
