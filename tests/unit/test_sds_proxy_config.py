"""`ztctl proxy-config secret`: istioctl's table and dumps, against goldens (UPDATE_GOLDEN=1 rewrites)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
import yaml

from ztctl.commands.proxy_config import (
    COLUMNS,
    render_dump,
    render_table,
    secret_rows,
    secrets_section,
    tabulate,
)
from ztctl.errors import CliError

GOLDEN = Path(__file__).parent.parent / "golden" / "sds"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def golden(name: str, got: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 rewrites it)"


@pytest.fixture
def section() -> dict:
    return secrets_section(json.loads((GOLDEN / "config_dump.json").read_text()))


def test_table_matches_golden(section: dict) -> None:
    rows = secret_rows(section, NOW)
    assert [(r.name, r.state) for r in rows] == [
        ("file-cert:/etc/certs/cert-chain.pem~/etc/certs/key.pem", "WARMING"),
        ("default", "ACTIVE"),
        ("ROOTCA", "ACTIVE"),
    ]
    golden("secret.txt", render_table(rows))


def test_valid_cert_follows_the_clock(section: dict) -> None:
    inside = dt.datetime(2026, 5, 15, 12, tzinfo=dt.UTC)
    assert [r.valid for r in secret_rows(section, inside)] == [False, True, True]
    assert [r.valid for r in secret_rows(section, NOW)] == [False, False, True]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_dumps_match_golden(section: dict, fmt: str) -> None:
    got = render_dump(section, fmt)
    golden(f"secret.{fmt}", got)
    parsed = json.loads(got) if fmt == "json" else yaml.safe_load(got)
    assert [s["name"] for s in parsed["dynamicActiveSecrets"]] == ["default", "ROOTCA"]
    assert parsed["dynamicActiveSecrets"][0]["secret"]["@type"].endswith("tls.v3.Secret")


def test_tabwriter_layout_is_istioctls() -> None:
    # The layout of istioctl's own golden (istioctl/pkg/writer/envoy/configdump/testdata/secret/istio/output):
    # each column is as wide as its widest cell plus five spaces, empty trailing cells leave no spaces.
    rows = [
        ("configmap://some/thing", "", "WARMING", "false", "", "", ""),
        (
            "default",
            "Cert Chain",
            "ACTIVE",
            "false",
            "6fbee254c22900615cb1f74e3d2f1713",
            "2023-05-16T01:32:52Z",
            "2023-05-15T01:30:52Z",
        ),
    ]
    lines = tabulate(COLUMNS, rows).splitlines()
    assert lines[0] == (
        "RESOURCE NAME              TYPE           STATUS      VALID CERT     SERIAL NUMBER"
        "                        NOT AFTER                NOT BEFORE"
    )
    assert lines[1] == "configmap://some/thing                    WARMING     false"
    assert lines[2].startswith("default                    Cert Chain     ACTIVE      false          6fbee254")


def test_no_secrets_and_bad_dumps() -> None:
    empty = {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"}
    assert render_table(secret_rows(empty, NOW)) == "No active or warming secrets found.\n"
    with pytest.raises(CliError, match="no 'configs' list"):
        secrets_section({"hello": 1})
    with pytest.raises(CliError, match="no secrets section"):
        secrets_section({"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"}]})
