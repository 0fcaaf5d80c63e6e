"""`ztctl proxy-config secret <envoy-admin-address>`: istioctl's secret table from Envoy's /config_dump.

The table is istioctl's (istioctl/pkg/writer/compare/sds): columns padded Go-tabwriter style (cell
width + 5), warming secrets first then active ones, TYPE `Cert Chain` or `CA` from the first certificate's
basic constraints, lowercase hex serial, RFC 3339 UTC times, VALID CERT = now within the validity.
`-o json|yaml` prints the SecretsConfigDump itself (proto JSON names, 4-space indent / YAML).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import yaml
from cryptography import x509
from envoy.admin.v3 import config_dump_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # noqa: F401 - registers the Secret type
from google.protobuf import json_format

from ztcore.config import Duration, option
from ztctl.errors import CliError

SECRETS_DUMP_TYPE = "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"
COLUMNS = ("RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE")


@dataclasses.dataclass(frozen=True)
class ProxyConfigSecretOptions:
    ENV_PREFIX = "ZTCTL"

    admin_address: str = option(
        "", "Envoy admin address, e.g. 127.0.0.1:15000", positional=True, metavar="ADMIN_ADDRESS"
    )
    output: str = option("short", "output format", choices=("short", "json", "yaml"), short="-o")
    timeout: Duration = option(Duration(10), "how long to wait for Envoy's admin endpoint")


@dataclasses.dataclass(frozen=True, slots=True)
class SecretRow:
    name: str
    type: str
    state: str
    valid: bool
    serial: str
    not_after: str
    not_before: str


def secrets_section(dump: Mapping[str, Any]) -> dict[str, Any]:
    """The SecretsConfigDump of a /config_dump document (JSON as Envoy writes it)."""
    configs = dump.get("configs")
    if not isinstance(configs, list):
        raise CliError("not an Envoy config dump: no 'configs' list")
    for section in configs:
        if isinstance(section, dict) and section.get("@type") == SECRETS_DUMP_TYPE:
            return section
    raise CliError("the config dump has no secrets section (is this an Envoy with SDS?)")


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(entry: Mapping[str, Any], state: str, now: dt.datetime) -> SecretRow:
    name = str(entry.get("name", ""))
    secret = entry.get("secret") or {}
    data_b64 = (((secret.get("tls_certificate") or {}).get("certificate_chain") or {}).get("inline_bytes")) or (
        ((secret.get("validation_context") or {}).get("trusted_ca") or {}).get("inline_bytes")
    )
    blank = SecretRow(name, "", state, False, "", "", "")
    if not data_b64:
        return blank
    try:
        # Like istioctl: only the first PEM block counts (the leaf, or the first root of a bundle).
        cert = x509.load_pem_x509_certificate(base64.b64decode(data_b64))
    except (ValueError, binascii.Error):
        return blank
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return SecretRow(
        name=name,
        type="CA" if is_ca else "Cert Chain",
        state=state,
        valid=cert.not_valid_before_utc < now < cert.not_valid_after_utc,
        serial=f"{cert.serial_number:x}",
        not_after=_rfc3339(cert.not_valid_after_utc),
        not_before=_rfc3339(cert.not_valid_before_utc),
    )


def secret_rows(section: Mapping[str, Any], now: dt.datetime) -> list[SecretRow]:
    """Warming secrets, then active ones (an active secret never initialised is UNINITIALIZED). Pure."""
    rows = [_row(e, "WARMING", now) for e in section.get("dynamic_warming_secrets", [])]
    for entry in section.get("dynamic_active_secrets", []):
        state = "UNINITIALIZED" if entry.get("version_info") == "uninitialized" else "ACTIVE"
        rows.append(_row(entry, state, now))
    return rows


def tabulate(header: Sequence[str], rows: Sequence[Sequence[str]], padding: int = 5) -> str:
    """Go text/tabwriter with padding 5 and no minimum: every cell but the last is padded to its column."""
    table = [list(header), *[list(r) for r in rows]]
    ncols = len(header)
    widths = [max(len(r[i]) for r in table) + padding for i in range(ncols - 1)]
    lines = []
    for r in table:
        line = "".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])) + r[-1]
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def render_table(rows: Sequence[SecretRow]) -> str:
    if not rows:
        return "No active or warming secrets found.\n"
    cells = [
        (r.name, r.type, r.state, "true" if r.valid else "false", r.serial, r.not_after, r.not_before) for r in rows
    ]
    return tabulate(COLUMNS, cells)


def render_dump(section: Mapping[str, Any], output: str) -> str:
    """The secrets section re-encoded as istioctl does: proto JSON (camelCase), or that JSON as YAML."""
    msg = config_dump_pb2.SecretsConfigDump()
    body = {k: v for k, v in section.items() if k != "@type"}
    try:
        json_format.ParseDict(body, msg, ignore_unknown_fields=True)
    except json_format.ParseError as err:
        raise CliError(f"cannot read the secrets section: {err}") from None
    text = json_format.MessageToJson(msg, indent=4)
    if output == "yaml":
        return str(yaml.safe_dump(json.loads(text), default_flow_style=False, sort_keys=True))
    return text + "\n"


async def fetch_config_dump(address: str, deadline: float) -> dict[str, Any]:
    base = address if address.startswith(("http://", "https://")) else f"http://{address}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=deadline)) as http,
            http.get(f"{base.rstrip('/')}/config_dump") as resp,
        ):
            if resp.status != 200:
                raise CliError(f"{base}/config_dump answered HTTP {resp.status}")
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        raise CliError(f"cannot reach Envoy admin at {address}: {err or type(err).__name__}") from None
    return _parse(text, f"{base}/config_dump")


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"{where} is not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise CliError(f"{where} is not an Envoy config dump")
    return data


def secret(opts: ProxyConfigSecretOptions) -> int:
    if not opts.admin_address:
        raise CliError("give the Envoy admin address, e.g. 127.0.0.1:15000")
    dump = asyncio.run(fetch_config_dump(opts.admin_address, float(opts.timeout)))
    section = secrets_section(dump)
    if opts.output == "short":
        sys.stdout.write(render_table(secret_rows(section, dt.datetime.now(dt.UTC))))
    else:
        sys.stdout.write(render_dump(section, opts.output))
    return 0
