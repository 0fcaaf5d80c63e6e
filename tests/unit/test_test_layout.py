"""Test modules never import one another: what several test files share lives in tests/support/ (issue 14).

Importing a test module runs its module-level code and ties one test file's refactors to another's; a helper
module under tests/support/ says what it holds and has one definition. The scan reads every .py under tests/
with `ast`, imports inside functions included.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


@dataclass(frozen=True)
class Known:
    """Imports from test modules that stay for now: `importer` is a glob on the repo-relative path, `imported` a
    glob on the dotted module name."""

    importer: str
    imported: str
    reason: str


# Empty since the bridge tests moved their shared fixtures to tests/support/ and tests/kernel/bridge_guest.py.
KNOWN: tuple[Known, ...] = ()


@dataclass(frozen=True)
class ImportOfTest:
    importer: str  # path relative to the repo, with "/"
    line: int
    imported: str  # dotted module name


def is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and parts[-1].startswith("test_")


def package_of(path: Path, root: Path) -> list[str]:
    return list(path.relative_to(root).with_suffix("").parts[:-1])


def imports_of_test_modules(path: Path, root: Path) -> list[ImportOfTest]:
    """Every import in `path` that names a module `tests.…test_*`."""
    rel = path.relative_to(root).as_posix()
    try:
        tree = ast.parse(path.read_text(), filename=rel)
    except SyntaxError as err:
        raise AssertionError(f"{rel} does not parse: {err}") from err
    found: list[ImportOfTest] = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = package_of(path, root)
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from tests.unit import test_x` imports the module test_x itself.
            modules = [module] if is_test_module(module) else [f"{module}.{alias.name}" for alias in node.names]
        found += [ImportOfTest(rel, node.lineno, m) for m in modules if is_test_module(m)]
    return found


def scan(root: Path) -> list[ImportOfTest]:
    return [imp for path in sorted((root / "tests").rglob("*.py")) for imp in imports_of_test_modules(path, root)]


def known_by(imp: ImportOfTest, known: tuple[Known, ...] = KNOWN) -> Known | None:
    return next(
        (k for k in known if fnmatchcase(imp.importer, k.importer) and fnmatchcase(imp.imported, k.imported)), None
    )


def test_no_test_module_imports_another() -> None:
    offending = [f"{i.importer}:{i.line} imports {i.imported}" for i in scan(ROOT) if known_by(i) is None]
    assert not offending, "move what these share into a tests/support/ module:\n" + "\n".join(offending)


def test_every_known_exception_is_still_needed() -> None:
    """An exception that matches nothing any more is deleted, so the list shows only what is left to move."""
    used = {known_by(i) for i in scan(ROOT)}
    stale = [f"{k.importer} -> {k.imported}" for k in KNOWN if k not in used]
    assert not stale, "remove these from KNOWN in tests/unit/test_test_layout.py:\n" + "\n".join(stale)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_scan_finds_every_form_of_import(tmp_path: Path) -> None:
    write(tmp_path, "tests/unit/test_a.py", "X = 1\n")
    write(
        tmp_path,
        "tests/unit/test_b.py",
        "from tests.unit.test_a import X\n"
        "import tests.unit.test_a\n"
        "from tests.unit import test_a\n"
        "from .test_a import X as Y\n"
        "from . import test_a as a\n"
        "def f():\n"
        "    from tests.unit.test_a import X\n",
    )
    write(tmp_path, "tests/e2e/test_c.py", "from ..unit.test_a import X\n")
    found = {(i.importer, i.line, i.imported) for i in scan(tmp_path)}
    assert found == {
        ("tests/unit/test_b.py", 1, "tests.unit.test_a"),
        ("tests/unit/test_b.py", 2, "tests.unit.test_a"),
        ("tests/unit/test_b.py", 3, "tests.unit.test_a"),
        ("tests/unit/test_b.py", 4, "tests.unit.test_a"),
        ("tests/unit/test_b.py", 5, "tests.unit.test_a"),
        ("tests/unit/test_b.py", 7, "tests.unit.test_a"),
        ("tests/e2e/test_c.py", 1, "tests.unit.test_a"),
    }


def test_the_scan_leaves_support_modules_and_other_packages_alone(tmp_path: Path) -> None:
    write(
        tmp_path,
        "tests/unit/test_b.py",
        "from tests.support.envoy_cases import CASES\n"
        "from tests.kube.conftest import wait_registry\n"
        "from aiohttp.test_utils import TestServer\n"
        "import test_outside_tests\n"
        "from . import helpers\n",
    )
    assert scan(tmp_path) == []


def test_a_file_that_does_not_parse_is_named(tmp_path: Path) -> None:
    write(tmp_path, "tests/unit/test_broken.py", "def (:\n")
    with pytest.raises(AssertionError, match=r"tests/unit/test_broken.py does not parse"):
        scan(tmp_path)


def test_known_exceptions_match_only_what_they_name() -> None:
    kernel = Known("tests/kernel/*.py", "tests.*", "example")
    bridge = Known("tests/unit/test_bridge_*.py", "tests.unit.test_bridge_*", "example")
    known = (kernel, bridge)
    assert known_by(ImportOfTest("tests/kernel/test_x.py", 1, "tests.kernel.test_bridge_kernel"), known) is kernel
    assert known_by(ImportOfTest("tests/unit/test_bridge_x.py", 1, "tests.unit.test_bridge_mesh"), known) is bridge
    assert known_by(ImportOfTest("tests/unit/test_bridge_x.py", 1, "tests.unit.test_xfrm_messages"), known) is None
    assert known_by(ImportOfTest("tests/unit/test_xfrm_netlink.py", 1, "tests.unit.test_xfrm_messages"), known) is None
    assert known_by(ImportOfTest("tests/e2e/test_x.py", 1, "tests.e2e.test_ads_ztunnel"), known) is None
