#!/usr/bin/env python3
"""Regenerate (or verify) the Python code for ztdpu's Istio-compatible protos.

This is the only code generation entry point for ``protos/``. It compiles
every ``*.proto`` below ``protos/`` with ``grpc_tools.protoc``, using the
repository root (plus grpc_tools' bundled well-known types) as the include
path, so proto imports read ``protos/istio/...`` and the generated modules
import each other as ``protos.istio.<pkg>.<name>_pb2``.

Outputs, written next to each ``.proto``:

* ``<name>_pb2.py`` and ``<name>_pb2.pyi`` (mypy-protobuf) for every file;
* ``<name>_pb2_grpc.py`` and ``<name>_pb2_grpc.pyi`` for files that declare a
  ``service``.

Usage (from any directory)::

    python protos/gen.py           # regenerate in place
    python protos/gen.py --check   # exit 1 if any committed output is stale

Needs grpcio-tools and mypy-protobuf (the ``dev`` extra) in the running
interpreter's environment.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent

# File name suffixes this script produces; anything matching them under
# protos/ is owned by the generator.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

_SERVICE_RE = re.compile(r"^\s*service\s+\w+\s*\{", re.MULTILINE)


def _proto_files() -> list[Path]:
    return sorted(PROTOS_DIR.rglob("*.proto"))


def _has_service(proto: Path) -> bool:
    return bool(_SERVICE_RE.search(proto.read_text(encoding="utf-8")))


def _find_plugin(name: str) -> str:
    """Locate a protoc plugin installed alongside the running interpreter."""
    candidates = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    for directory in candidates:
        path = directory / name
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"gen.py: protoc plugin {name!r} not found (install mypy-protobuf)")


def _protoc(args: list[str]) -> None:
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - environment problem
        raise SystemExit(f"gen.py: grpcio-tools is not installed: {exc}") from exc

    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    argv = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{well_known}", *args]
    rc = protoc.main(argv)
    if rc != 0:
        raise SystemExit(f"gen.py: protoc failed (exit {rc}) for: {' '.join(args)}")


def generate(out_dir: Path) -> None:
    """Compile every proto below protos/ into ``out_dir`` (mirrors the repo layout)."""
    protos = _proto_files()
    if not protos:
        raise SystemExit("gen.py: no .proto files found under protos/")
    out = str(out_dir)
    mypy = _find_plugin("protoc-gen-mypy")
    _protoc(
        [
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--python_out={out}",
            f"--mypy_out=quiet:{out}",
            *(str(p) for p in protos),
        ]
    )
    with_service = [p for p in protos if _has_service(p)]
    if with_service:
        mypy_grpc = _find_plugin("protoc-gen-mypy_grpc")
        _protoc(
            [
                f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
                f"--grpc_python_out={out}",
                f"--mypy_grpc_out=quiet:{out}",
                *(str(p) for p in with_service),
            ]
        )


def _generated_files(root: Path) -> set[Path]:
    """Generator-owned files below ``root/protos``, relative to ``root``."""
    base = root / "protos"
    if not base.is_dir():
        return set()
    return {p.relative_to(root) for p in base.rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)}


def check() -> int:
    with tempfile.TemporaryDirectory(prefix="ztdpu-protos-") as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        fresh = _generated_files(tmp_root)
        committed = _generated_files(REPO_ROOT)
        for rel in sorted(fresh | committed):
            new = tmp_root / rel
            old = REPO_ROOT / rel
            if not old.is_file():
                reason = "missing"
            elif not new.is_file():
                reason = "orphaned (no longer generated)"
            elif old.read_bytes() != new.read_bytes():
                reason = "out of date"
            else:
                continue
            print(
                f"gen.py --check: stale generated file {rel.as_posix()} ({reason}); run: python protos/gen.py",
                file=sys.stderr,
            )
            return 1
    return 0


def regenerate() -> int:
    with tempfile.TemporaryDirectory(prefix="ztdpu-protos-") as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        fresh = _generated_files(tmp_root)
        for rel in sorted(_generated_files(REPO_ROOT) - fresh):
            (REPO_ROOT / rel).unlink()
            print(f"removed {rel.as_posix()}")
        for rel in sorted(fresh):
            dest = REPO_ROOT / rel
            data = (tmp_root / rel).read_bytes()
            if dest.is_file() and dest.read_bytes() == data:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            print(f"wrote {rel.as_posix()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if committed files differ",
    )
    args = parser.parse_args(argv)
    return check() if args.check else regenerate()


if __name__ == "__main__":
    sys.exit(main())
