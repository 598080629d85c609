"""The software's version, one source for every command and for what a unit reports."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "checkpoint"
# Used when the code runs from a source tree that was never installed (keep equal to pyproject.toml).
FALLBACK_VERSION = "0.1.0"


def software_version() -> str:
    """The installed `checkpoint` distribution's version, or the source tree's when not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return FALLBACK_VERSION


VERSION_MESSAGE = "%(prog)s (checkpoint) %(version)s"
