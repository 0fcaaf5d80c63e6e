"""Run a command inside a real Linux kernel: the project's user-mode-linux 6.1, booted by tools/uml-kernel/run.

`run_in_uml([...], timeout)` boots the kernel with this machine's filesystem as its root (veth, XFRM, ESP with
its offload hooks, AES-GCM and netdevsim built in), runs the command there (same cwd; TMPDIR=/run, a tmpfs private
to the guest) and returns its exit code, stdout and stderr. The kernel comes from scripts/uml-kernel.sh: built
from Debian's linux-source-6.1 on first use (a few minutes; parallel callers wait for one build), then cached
outside the tree. When it cannot be built, UmlUnavailable says why. Nothing here skips.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tools" / "uml-kernel" / "run"
BUILD = REPO / "scripts" / "uml-kernel.sh"
HARNESS_ERROR = "uml-run: harness error:"
# A cold build is minutes on two idle cores; allow for a CI host that is also building Istio and Kubernetes.
BUILD_TIMEOUT = 3600


class UmlUnavailable(RuntimeError):
    """The project's UML kernel is not there and could not be built."""


@functools.cache  # one build check per test session; a failure is not cached
def ensure_kernel() -> str:
    """Path of the project's UML kernel, building it first when it is missing (progress goes to stderr)."""
    try:
        done = subprocess.run(
            [str(BUILD)], stdout=subprocess.PIPE, stderr=None, text=True, timeout=BUILD_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UmlUnavailable(f"building the UML kernel failed: {exc}") from exc
    path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not os.access(path, os.X_OK):
        raise UmlUnavailable(f"building the UML kernel failed (exit {done.returncode}); scripts/uml-kernel.sh says why")
    return path


class UmlHarnessError(RuntimeError):
    """The guest did not produce a result: boot failure or timeout."""


def run_in_uml(
    command: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    mem: str = "1G",
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `command` inside UML as root; returncode/stdout/stderr are the command's own."""
    kernel = ensure_kernel()
    guest = [*(["env", *(f"{k}={v}" for k, v in env.items())] if env else []), *command]
    argv = [str(RUN), "--mem", mem, "--timeout", str(max(1, int(timeout))), "--", *guest]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            cwd=cwd or REPO,
            check=False,
            env={**os.environ, "ZTDPU_UML_KERNEL": kernel},
        )
    except subprocess.TimeoutExpired as exc:
        raise UmlHarnessError(f"UML did not stop within {timeout + 30:.0f}s: {shlex.join(guest)}") from exc
    if done.returncode == 125 and HARNESS_ERROR in done.stderr:
        raise UmlHarnessError(done.stderr.strip())
    return subprocess.CompletedProcess(list(command), done.returncode, done.stdout, done.stderr)
