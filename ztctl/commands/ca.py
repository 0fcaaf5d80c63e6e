"""`ztctl ca root`: the trust bundle clients should use."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from cryptography import x509

from ztcore.config import Duration, option
from ztctl.errors import CliError


@dataclasses.dataclass(frozen=True)
class CaRootOptions:
    ENV_PREFIX = "ZTCTL"

    state_dir: Path = option(Path(".ztd"), "ztd's state folder", env="ZTD_STATE_DIR")


def root(opts: CaRootOptions) -> int:
    path = opts.state_dir / "root-cert.pem"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"no root bundle at {path} (has ztd run with --state-dir {opts.state_dir}?)") from None
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CliError(f"{path} is not a PEM certificate bundle") from None
    sys.stdout.write(data.decode())
    return 0


@dataclasses.dataclass(frozen=True)
class CaIssueOptions:
    ENV_PREFIX = "ZTCTL"

    token: str = option("", "bearer token (see `ztctl token create`); or --token-file")
    token_file: Path | None = option(None, "file holding the bearer token")
    address: str = option("127.0.0.1:15012", "CA address (TLS)", env="CA_ADDR")
    server_name: str = option("istiod.istio-system.svc", "name the CA's serving certificate is checked against")
    state_dir: Path = option(Path(".ztd"), "ztd's state folder, for the root bundle", env="ZTD_STATE_DIR")
    root_cert: Path | None = option(None, "root bundle to trust [default: <state-dir>/root-cert.pem]")
    impersonate: str = option("", "ImpersonatedIdentity to request (node agents only)")
    ttl: Duration = option(Duration(0), "requested lifetime; 0 = the CA's default")
    key_type: str = option("ecdsa-p256", "workload key type", choices=("ecdsa-p256", "ecdsa-p384", "rsa-2048"))
    out_dir: Path | None = option(None, "write key.pem (0600), cert-chain.pem and root-cert.pem here")
    timeout: Duration = option(Duration(10), "how long to wait for the CA")


def issue(opts: CaIssueOptions) -> int:
    from ztctl.commands import ca_issue

    return ca_issue.run(opts)
