"""The host half of every bench that runs inside user-mode-linux: boot it, run the bench with --inside, and
return the `RESULT <json>` the guest printed (or print why there is none, on one line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_inside(prog: str, script: str, args: list[str], *, timeout: float, mem: str) -> dict[str, Any] | None:
    """`script --inside *args` in UML; its result, or None after printing `prog: why` to stderr."""
    from tests.kernel.uml import UmlHarnessError, UmlUnavailable, run_in_uml

    argv = [sys.executable, str(Path(script).resolve()), "--inside", *args]
    try:
        done = run_in_uml(argv, timeout=timeout, env={"PYTHONPATH": str(REPO)}, mem=mem)
    except (UmlUnavailable, UmlHarnessError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:] or ["no output"]
        print(f"{prog}: the run inside UML failed (exit {done.returncode}): {' | '.join(tail)}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result
