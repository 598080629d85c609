"""The TOML parser every config reader uses: the standard library's from Python 3.11, tomli (the same
parser before it joined the standard library, a dependency on 3.10 only, as JetPack 6 ships) before."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

TOMLDecodeError = tomllib.TOMLDecodeError
loads = tomllib.loads

__all__ = ["TOMLDecodeError", "loads"]
