"""docs/watchlist.md's HQ walkthrough, run as written: every ```sh block of that section, in order,
in an empty folder holding only the case photos (as sqlite-utils checks the commands in its docs).

Set WALKTHROUGH_TRANSCRIPT=FILE to keep the terminal session (each command, then its output).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "watchlist.md"
SECTION = "## HQ walkthrough"


def walkthrough_blocks(text: str) -> list[str]:
    """The ```sh blocks of the walkthrough section, in order."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)


def _photos(folder: Path) -> None:
    from PIL import Image
    from skimage import data

    folder.mkdir()
    a = data.astronaut()
    portrait = np.concatenate([np.full((120, 512, 3), 40, np.uint8), a], axis=0)
    portrait[30:93, 200:245] = np.asarray(Image.fromarray(a[20:230, 150:300]).resize((45, 63)))
    Image.fromarray(portrait).save(folder / "0173-portrait.png")
    Image.fromarray(np.ascontiguousarray(a[:, ::-1])).save(folder / "0174-school.png")
    Image.fromarray(a).resize((96, 96)).save(folder / "0175-far.png")


def test_the_walkthrough_parses_into_blocks() -> None:
    blocks = walkthrough_blocks(DOC.read_text())
    assert len(blocks) >= 5 and blocks[0].strip() == "watchlist keygen --dir hq-keys"
    commands = " ".join(blocks)
    for sub in ("keygen", "enrol", "build", "inspect", "list", "publish", "remove", "releases", "--delta"):
        assert f"watchlist {sub}" in commands or sub in commands
    assert "edge watchlist apply" in commands and "edge watchlist list" in commands  # the unit's side


def test_the_hq_walkthrough_runs_as_documented(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    work = tmp_path / "hq"
    work.mkdir()
    _photos(work / "photos")
    shim = tmp_path / "bin"
    shim.mkdir()
    # The documented commands (HQ's `watchlist`, the unit's `edge`), running this checkout's code with this interpreter.
    for name, module in (("watchlist", "watchlist.cli"), ("edge", "edge.cli")):
        (shim / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        (shim / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), COLUMNS="120")
    transcript = []
    for block in walkthrough_blocks(DOC.read_text()):
        script = 'set -euo pipefail\ntrap \'printf "$ %s\\n" "$BASH_COMMAND"\' DEBUG\n' + block
        r = subprocess.run(
            ["bash", "-c", script],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
            check=False,
        )
        transcript.append(r.stdout)
        assert r.returncode == 0, f"block failed:\n{block}\n--- output ---\n{r.stdout}"
    out = "".join(transcript)
    if os.environ.get("WALKTHROUGH_TRANSCRIPT"):
        Path(os.environ["WALKTHROUGH_TRANSCRIPT"]).write_text(out)

    # What the walkthrough says happens, happens.
    assert "another face ignored" in out  # the portrait's second face: enrolled with a warning
    assert "REFUSED  cases.csv:4 case-2024-0175" in out and "needs at least 40" in out
    assert "exit status 1: some photos refused" in out
    # The first build enrolled the canary person (docs/watchlist.md, The canary person): one more
    # person, with two templates, on every list.
    assert "canary person enrolled for model" in out
    assert "applied: watchlist version 1 (3 persons, 4 templates)" in out
    assert "not in the register (check the ids): case-2024-9999" in out and "exit status 1: unknown id" in out
    assert "dry run: would write delta 1->2" in out and "removed 1: case-2024-0174" in out
    assert "delta bundle, version 2 (delta from version 1)" in out and "signature: valid" in out
    assert "applied: watchlist version 2 (2 persons, 3 templates)" in out
    releases = [line.split() for line in out.splitlines() if re.match(r"^\s+[12]\s+(full|delta)\s", line)]
    assert [(r[0], r[1], r[-1].split(":")[0]) for r in releases] == [("1", "full", "file"), ("2", "delta", "file")]
    assert sorted(p.name for p in (work / "usb").iterdir()) == [
        "watchlist-v1-full.cpwl",
        "watchlist-v2-delta-from-1.cpwl",
    ]
