"""Shared test setup. Fixture modules live in tests/fixtures/ and are all loaded here."""

from __future__ import annotations

import pathlib

import pytest

from testing.media import LAG_DIR

_FIXTURES = pathlib.Path(__file__).parent / "fixtures"
pytest_plugins = sorted(f"tests.fixtures.{p.stem}" for p in _FIXTURES.glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture(scope="session")
def lag_dir() -> pathlib.Path:
    """The cross-age evaluation set (../shared/data/lag-dev, or under CHECKPOINT_DATA); tests that
    need it skip where it is absent."""
    if not LAG_DIR.is_dir():
        pytest.skip(f"needs the evaluation data at {LAG_DIR} (../shared/data beside the checkout)")
    return LAG_DIR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads the evaluation data must carry the `data` marker, so `-m "not data"` means what it says."""
    unmarked = [
        item.nodeid
        for item in items
        if "lag_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("data") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that use lag_dir need @pytest.mark.data: {', '.join(unmarked)}")
