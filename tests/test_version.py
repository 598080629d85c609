"""`--version` on every command, from the one source (common/version.py)."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from common.version import FALLBACK_VERSION, software_version


@pytest.mark.parametrize("module", ["edge.cli", "watchlist.cli", "engines.cli", "central.cli"])
def test_every_command_prints_the_software_version(module: str) -> None:
    main = importlib.import_module(module).main
    result = CliRunner().invoke(main, ["--version"], prog_name="cmd")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"cmd (checkpoint) {software_version()}"


def test_the_version_is_the_installed_distributions_or_the_fallback(monkeypatch) -> None:
    from importlib import metadata

    import common.version as v

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(v.metadata, "version", missing)
    assert v.software_version() == FALLBACK_VERSION


def test_the_fallback_matches_pyproject() -> None:
    import pathlib

    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == FALLBACK_VERSION
