"""What the `watchlist` commands share: durations and passphrases from the command line, the
failure exit, the known-answer self-test, and HQ's key folder."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from common.files import atomic_write

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from engines.face_engine import FaceEngine
    from watchlist.format.keys import KeySet

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds in `text`: a number with an optional unit (s, m, h, d), as --valid-for takes it."""
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: give a duration such as 3600, 90m, 12h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def passphrase(env: str | None) -> bytes | None:
    """The key passphrase held in the environment variable `env` (--passphrase-env), or None."""
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise click.UsageError(f"environment variable {env} is empty or unset; it should hold the key passphrase")
    return value.encode()


def fail(exc: Exception) -> NoReturn:
    """Say what went wrong on stderr and stop with exit status 2."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def selftest(engine: FaceEngine | None = None) -> None:
    """The known-answer self-test a unit runs at start (docs/edge.md, "Self-test at start"): the
    engine's models when one is given, and the matcher. A wrong answer stops the command (exit
    status 2) with the check, the figures and the CPU features: HQ must not enrol or build on a
    machine that computes them wrongly."""
    from engines.cpu import cpu_features
    from engines.errors import EngineError
    from engines.known_answers import check_engine
    from matching.selftest import MatcherSelfTestError, check_matcher

    features = cpu_features()
    try:
        checks = list(check_engine(engine).checks) if engine is not None else []
        dim = int(engine.embedding_dim) if engine is not None else 129
        check_matcher(dim, cpu_features=features)
    except (EngineError, MatcherSelfTestError) as exc:
        fail(exc)
    log.info(
        "known-answer self-test passed: %s; CPU features: %s", ", ".join([*checks, "matcher"]), ", ".join(features)
    )


class KeyDir:
    """HQ's key folder: root.key (keep offline), root.pub (pin on units), keyset.bin, signing-<id>.key."""

    def __init__(self, path: Path, passphrase: bytes | None) -> None:
        self.path = Path(path)
        self.passphrase = passphrase

    def root(self) -> Ed25519PrivateKey:
        """The root key (it signs key sets)."""
        from watchlist.format.keys import load_private_key

        return load_private_key(self.path / "root.key", self.passphrase)

    def keyset(self) -> KeySet:
        """The key set in force, verified against root.pub."""
        from watchlist.format.keys import load_public_key, parse_keyset, read_keyset_file

        return parse_keyset(read_keyset_file(self.path / "keyset.bin"), load_public_key(self.path / "root.pub"))

    def current_signing(self) -> Ed25519PrivateKey:
        """The signing key named by signing.current (it signs bundles)."""
        from watchlist.format.keys import load_private_key

        kid = (self.path / "signing.current").read_text().strip()
        return load_private_key(self.path / f"signing-{kid}.key", self.passphrase)

    def new_signing(self) -> tuple[Ed25519PrivateKey, str]:
        """A new signing key, saved in the folder, and its key id."""
        from watchlist.format.keys import generate_key, key_id, save_private_key

        key = generate_key()
        kid = key_id(key.public_key())
        save_private_key(key, self.path / f"signing-{kid}.key", self.passphrase)
        return key, kid

    def write_keyset(self, envelope: bytes, current: str | None) -> None:
        """Replace keyset.bin with `envelope`, and make `current` (a key id) the signing key if given."""
        atomic_write(self.path / "keyset.bin", envelope)
        if current:
            atomic_write(self.path / "signing.current", (current + "\n").encode())
