"""Which package may import which: the shared core below everything, the server above the bridge and CLI.

ztcore (model, mesh registry and translation, Envoy config builders, rbac, xDS engine, caller authentication,
the certificate manager)
imports none of the products; the bridge, the CLI and the CA/SDS agent never import the xDS server, so they run
(and install) without it, and the bridge needs nothing of the SDS agent. The general layers and the absence of
import cycles are import-linter's contracts (pyproject.toml, `tox -e lint`); this test adds what a run needs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> packages of ours it must never import
FORBIDDEN = {
    "ztcore": {"sds", "xds_server", "ipsec_bridge", "ztctl"},
    "ipsec_bridge": {"xds_server", "ztctl", "sds"},
    "xds_server": {"ipsec_bridge", "ztctl"},
    "ztctl": {"xds_server", "ipsec_bridge"},
    "sds": {"xds_server", "ipsec_bridge", "ztctl"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level package of every import in the file (also imports inside functions), with its line."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_below_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in files
        for top, line in sorted(imported_packages(path))
        if top in FORBIDDEN[package]
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("entry", "absent"),
    [("ipsec_bridge.main", "xds_server"), ("ipsec_bridge.main", "sds"), ("ztctl.cli", "xds_server")],
)
def test_entry_points_load_without_the_packages_they_must_not_need(entry: str, absent: str) -> None:
    """Importing an entry point in a fresh interpreter pulls in no module of `absent` (transitively)."""
    probe = (
        f"import sys, {entry}\n"
        f"print(sorted(m for m in sys.modules if m == {absent!r} or m.startswith({absent + '.'!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_checker_sees_an_offending_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from xds_server.translate import translate\n")
    assert ("xds_server", 2) in imported_packages(module)
