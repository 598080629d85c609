"""The layout's rule, checked: no package imports a package above it (docs/architecture.md).

Every import counts, including those inside functions: a lazy import still ties one role's install
to another's packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each layer and the layers it may import (besides itself). Roles are edge, central, watchlist.hq and
# the watchlist CLI; testing (tests, benchmarks, the demo) sits on top and may use anything.
# watchlist.format.register_read is its own layer: the centre may read HQ's register through it and
# through nothing else of watchlist.format, and it imports nothing of ours (the standard library only).
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "watchlist.format.register_read": set(),
    "engines": {"common"},
    "matching": {"common"},
    "wire": {"common"},
    "watchlist.format": {"common", "wire", "watchlist.format.register_read"},
    "watchlist.unit": {"common", "wire", "matching", "watchlist.format"},
    "watchlist.hq": {"common", "wire", "engines", "watchlist.format", "watchlist.format.register_read"},
    "watchlist.cli": {"common", "wire", "engines", "matching", "watchlist.format", "watchlist.unit", "watchlist.hq"},
    "watchlist": set(),
    "edge": {"common", "wire", "engines", "matching", "watchlist.format", "watchlist.unit"},
    "central": {"common", "wire", "watchlist.format.register_read"},
    "testing": {
        "common",
        "wire",
        "engines",
        "matching",
        "watchlist.format",
        "watchlist.format.register_read",
        "watchlist.unit",
        "watchlist.hq",
        "edge",
        "central",
    },
}
PACKAGES = sorted({layer.split(".")[0] for layer in ALLOWED})


def layer_of(module: str) -> str | None:
    """The most specific layer a dotted module name belongs to, or None if it is not ours."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in ALLOWED:
            return ".".join(parts[:n])
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from watchlist import hq` imports the subpackage watchlist.hq.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def crossings() -> list[str]:
    problems = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            here = layer_of(module_name(path))
            if here is None:
                problems.append(f"{path.relative_to(REPO)}: in no layer; add it to ALLOWED in {__file__}")
                continue
            for line, target in imports_of(path):
                if target.split(".")[0] in ("tests", "bench"):
                    problems.append(f"{path.relative_to(REPO)}:{line}: {here} imports {target} (test/bench code)")
                    continue
                there = layer_of(target)
                if there is None or there == here or there in ALLOWED[here]:
                    continue
                problems.append(f"{path.relative_to(REPO)}:{line}: {here} imports {target} ({there} is not below it)")
    return problems


def test_no_package_imports_a_package_above_it() -> None:
    assert crossings() == []


def test_the_layer_check_catches_a_crossing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from edge.reporter import MqttReporter\n\nfrom watchlist import hq\nimport tests.services\n"
    )
    found = {target for _, target in imports_of(bad)}
    assert {"edge.reporter", "watchlist.hq", "tests.services"} <= found
    assert layer_of("edge.reporter") not in ALLOWED["central"]
    assert layer_of("watchlist.hq") not in ALLOWED["watchlist.unit"]


@pytest.mark.parametrize(
    ("modules", "heavy"),
    [
        (
            ["central.cli", "central.receiver", "central.store", "central.register_view", "wire.mqtt", "wire.records"],
            ["cv2", "onnxruntime", "av", "numpy", "sqlite_utils"],
        ),
        (
            ["watchlist.cli", "watchlist.unit.apply", "watchlist.hq.build", "edge.cli", "edge.config"],
            ["cv2", "onnxruntime", "av"],
        ),
    ],
)
def test_heavy_libraries_are_imported_only_where_used(modules: list[str], heavy: list[str]) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", f"importing {modules} loaded {out.stdout.strip()}"
