"""`ztctl token create NS/SA`: like `kubectl create token`, for ztd's embedded token issuer."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from sds.ca import issuer
from ztcore.config import Duration, option
from ztcore.mesh.registry.files import RegistryLoadError, load_dir
from ztcore.mesh.registry.objects import Pod, default_uid
from ztctl.errors import CliError


@dataclasses.dataclass(frozen=True)
class TokenCreateOptions:
    ENV_PREFIX = "ZTCTL"

    account: str = option("", "service account as NAMESPACE/NAME", positional=True, metavar="NS/SA")
    audience: tuple[str, ...] = option(["istio-ca"], "audience(s) of the token")
    duration: Duration = option(Duration(3600), "lifetime, e.g. 1h or 30m")
    pod: str = option("", "bind the token to this pod of the account's namespace")
    pod_uid: str = option("", "UID of --pod [default: looked up in --config-dir, else ztd's derived UID]")
    node: str = option("", "bind the token to this node")
    state_dir: Path = option(Path(".ztd"), "ztd's state folder (holds the issuer key)", env="ZTD_STATE_DIR")
    config_dir: Path | None = option(None, "ztd's --config-dir, to look up the pod's UID", env="ZTD_CONFIG_DIR")
    trust_domain: str = option("cluster.local", "trust domain ztd runs with", env="TRUST_DOMAIN")


def _pod_uid(opts: TokenCreateOptions, namespace: str) -> str:
    if opts.pod_uid:
        return opts.pod_uid
    if opts.config_dir is not None:
        try:
            objects, errors = load_dir(opts.config_dir)
        except RegistryLoadError as err:
            raise CliError(str(err)) from None
        if errors:
            raise CliError(f"{opts.config_dir} has errors, first: {errors[0]}")
        for obj in objects:
            if isinstance(obj, Pod) and obj.meta.namespace == namespace and obj.meta.name == opts.pod:
                return obj.meta.uid
        raise CliError(f"pod {namespace}/{opts.pod} is not in {opts.config_dir}")
    return default_uid("Pod", namespace, opts.pod)


def create(opts: TokenCreateOptions) -> int:
    namespace, sep, account = opts.account.partition("/")
    if not sep or not namespace or not account or "/" in account:
        raise CliError(f"{opts.account!r} is not NAMESPACE/SERVICEACCOUNT")
    if opts.duration <= 0:
        raise CliError("--duration must be positive")
    if opts.pod_uid and not opts.pod:
        raise CliError("--pod-uid needs --pod")
    try:
        tokens = issuer.load(opts.state_dir / "issuer", opts.trust_domain)
        jwt = tokens.mint(
            namespace,
            account,
            audiences=list(opts.audience),
            duration=dt.timedelta(seconds=opts.duration),
            now=dt.datetime.now(dt.UTC),
            pod_name=opts.pod,
            pod_uid=_pod_uid(opts, namespace) if opts.pod else "",
            node_name=opts.node,
        )
    except issuer.IssuerError as err:
        raise CliError(str(err)) from None
    print(jwt)
    return 0
