"""`ztctl ca root`: the trust bundle clients should use."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from cryptography import x509

from ztcore.config import option
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
