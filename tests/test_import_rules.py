"""No package or benchmark imports test code.

`lint-imports` (pyproject.toml) checks the packages' layers and the shared test modules by name; test modules
are not a package but top-level modules on sys.path, so this walks the packages and the benchmarks for an
import of any module in tests/ (lazy imports too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULES = {"tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
SOURCES = sorted(p for d in ("twinrt", "router", "serving", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """The top-level name of every module `path` imports, anywhere in it (relative imports left out)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_package_or_benchmark_imports_test_code() -> None:
    found = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & TEST_MODULES) for p in SOURCES}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_lazy_imports(tmp_path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from helpers import KEY\n    import test_router_synth.x\n")
    assert imported_modules(src) & TEST_MODULES == {"helpers", "test_router_synth"}
