"""Run a command inside a real Linux kernel: Debian's user-mode-linux (6.1) booted by tests/kernel/uml/run.

`run_in_uml([...], timeout)` boots the kernel with this machine's filesystem as its root, loads veth,
xfrm_user, esp4/esp6 (+ offload) and the AES-GCM templates, runs the command there (same cwd; TMPDIR=/run, a
tmpfs private to the guest) and returns its exit code, stdout and stderr. When linux.uml is missing it installs
it first (scripts/install-kernel-deps.sh: apt-get update, then apt-get install user-mode-linux kmod iproute2
tcpdump iputils-ping), or raises UmlUnavailable saying why. Nothing here skips.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN = Path(__file__).resolve().parent / "uml" / "run"
INSTALL = REPO / "scripts" / "install-kernel-deps.sh"
HARNESS_ERROR = "uml-run: harness error:"


class UmlUnavailable(RuntimeError):
    """user-mode-linux is not there and could not be installed."""


class UmlHarnessError(RuntimeError):
    """The guest did not produce a result: boot failure, missing module, or timeout."""


def ensure_uml() -> str:
    """Path of linux.uml, installing the Debian packages first when it is missing."""
    found = shutil.which("linux.uml")
    if found:
        return found
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        raise UmlUnavailable(f"linux.uml is missing and this is not root: run {INSTALL} as root")
    try:
        done = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UmlUnavailable(f"installing user-mode-linux failed: {exc}") from exc
    found = shutil.which("linux.uml")
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise UmlUnavailable(f"installing user-mode-linux failed (exit {done.returncode}): {' | '.join(tail)}")
    return found


def run_in_uml(
    command: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    mem: str = "1G",
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `command` inside UML as root; returncode/stdout/stderr are the command's own."""
    ensure_uml()
    guest = [*(["env", *(f"{k}={v}" for k, v in env.items())] if env else []), *command]
    argv = [str(RUN), "--mem", mem, "--timeout", str(max(1, int(timeout))), "--", *guest]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, cwd=cwd or REPO, check=False)
    except subprocess.TimeoutExpired as exc:
        raise UmlHarnessError(f"UML did not stop within {timeout + 30:.0f}s: {shlex.join(guest)}") from exc
    if done.returncode == 125 and HARNESS_ERROR in done.stderr:
        raise UmlHarnessError(done.stderr.strip())
    return subprocess.CompletedProcess(list(command), done.returncode, done.stdout, done.stderr)
