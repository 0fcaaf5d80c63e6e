"""The real Istio binaries (pilot-agent, istioctl) for interop tests, built by scripts/istio-tools.sh.

`istio_tools()` returns their paths and builds them first when they are missing, so the test command
installs what it needs itself. The build (Go, from the module proxy) is cached outside the work tree in
${ZTDPU_CACHE:-~/.cache/ztdpu}/tools/istio-<pin>/, so a fresh clone reuses it.

Use the session fixture from a conftest.py:  `from tests.support.istio_tools import istio_tools_fixture`
(then `istio_tools_fixture` is available; or re-export it under another name).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "istio-tools.sh"
# A cold build of both tools takes minutes on 2 cores; a warm cache answers in milliseconds.
BUILD_TIMEOUT = 45 * 60.0


class IstioToolsError(Exception):
    """The tools could not be found or built; the message says why in one readable paragraph."""


@dataclass(frozen=True, slots=True)
class IstioTools:
    root: Path  # ${cache}/tools/istio-<pin>
    pilot_agent: Path
    istioctl: Path
    bootstrap_template: Path  # the Envoy bootstrap template shipped with this exact pilot-agent

    @property
    def pin(self) -> str:
        return self.root.name.removeprefix("istio-")


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if shutil.which("bash") is None:
        raise IstioToolsError("bash is needed to run scripts/istio-tools.sh")
    try:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=os.environ.copy(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise IstioToolsError(f"scripts/istio-tools.sh {' '.join(args)} did not finish in {timeout:.0f}s") from None


def _layout(bin_dir: Path) -> IstioTools:
    root = bin_dir.parent
    return IstioTools(
        root=root,
        pilot_agent=bin_dir / "pilot-agent",
        istioctl=bin_dir / "istioctl",
        bootstrap_template=root / "share" / "envoy_bootstrap_tmpl.json",
    )


def _complete(tools: IstioTools) -> bool:
    return (
        all(os.access(p, os.X_OK) for p in (tools.pilot_agent, tools.istioctl)) and tools.bootstrap_template.is_file()
    )


def istio_tools(*, build: bool = True, timeout: float = BUILD_TIMEOUT) -> IstioTools:
    """Paths of the pinned Istio tools; builds them (blocking, minutes when cold) if any is missing."""
    located = _script("--bin-dir", timeout=30)
    if located.returncode != 0 or not located.stdout.strip():
        raise IstioToolsError(f"scripts/istio-tools.sh --bin-dir failed: {located.stderr.strip()}")
    tools = _layout(Path(located.stdout.strip()))
    if _complete(tools):
        return tools
    if not build:
        raise IstioToolsError(f"Istio tools missing under {tools.root}; run scripts/istio-tools.sh")
    built = _script(timeout=timeout)
    if built.returncode != 0:
        raise IstioToolsError(f"scripts/istio-tools.sh failed (exit {built.returncode}):\n{built.stderr.strip()}")
    if not _complete(tools):
        raise IstioToolsError(f"scripts/istio-tools.sh succeeded but {tools.root} is incomplete")
    return tools


@pytest.fixture(scope="session")
def istio_tools_fixture() -> IstioTools:
    """The pinned Istio tools, built on first use. A build failure fails the test (never skips it)."""
    try:
        return istio_tools()
    except IstioToolsError as err:
        pytest.fail(str(err), pytrace=False)
