"""Every bench script runs as the README and the docs run it.

Each script under bench/ answers --help and runs end to end on a tiny input (a few-photo folder in
the LAG layout cut from scikit-image's public-domain astronaut photo, small counts), writing JSON that
names the machine (bench.machine); and every `python bench/X.py ...` command line in README.md,
docs/*.md and the scripts' own docstrings names a script that exists and only flags it accepts.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.machine import cpu_model, describe_machine, machine_summary
from tests.services import missing_service

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Imported by the scripts, never run by themselves.
MODULES = ("__init__", "detector_stream", "lag", "machine", "pipeline_phases", "pipeline_scene")
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in MODULES)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A run small enough for seconds; {data}: the fake data root (holding lag-dev/), {lag}: its lag-dev,
# {json}: where the script writes its figures.
SMOKE = {
    "accuracy": "--data {lag} --limit 4 --no-peer --json {json}",
    "alignment_parity": "--data {lag} --limit 4 --json {json}",
    # Written and compared in one run: the comparison of a run with itself must find no difference.
    "cpu_agreement": "--data {lag} --limit 2 --out {tmp}/answers.npz --against {tmp}/answers.npz --json {json}",
    "detector": "--data {data} --limit 2 --repeats 1 --mtcnn-only --json {json}",
    "detector --stream": "--data {data} --stream 1 --json {json}",
    "ensemble_weights": "--data {lag} --half a --config bench/configs/ensemble.toml --step 0.5 --splits 2 --json {json}",
    "fit_box_mapping": "--data {lag} --json {json}",
    "fleet": "--units 5 --minutes 0.05 --heartbeat-s 1 --hits-per-unit-hour 3600 --db {tmp}/fleet.sqlite --json {json}",
    "int8_accuracy": "--data {lag} --limit 4 --json {json}",
    "matching": "--templates 2000 --batches 2 --delta-persons 10 --json {json}",
    # dlib alone: the default ensemble's npm members have no packaged calibration, and the few photos here
    # give too few stranger pairs to make one for their second look.
    "openset": "--data {lag} --splits 2 --no-peer --no-levers --config bench/configs/dlib.toml --json {json}",
    # The scene schedule needs 4 s of clip; the evaluation data is used where present (no --data flag).
    "pipeline": "--no-peer --phases ours --seconds 4 --live-seconds 0 --json {json}",
    "quality_thresholds": "--data {lag} --limit 4 --json {json}",
    "reporting": "--puts 20 --hits 20 --latency-hits 5 --rate 100 --backlog 20 --no-postgres --json {json}",
    "store": "--db {tmp}/hits.sqlite --hits 20 --json {json}",
    "throughput": "--images 2 --no-peer --no-peak --no-int8 --threads 1 --json {json}",
    "watchlist_scale": "--persons 200 --delta 20 --json {json}",
}
NEEDS_MOSQUITTO = {"fleet", "reporting"}

COMMAND = re.compile(r"\bpython3?\s+(?:\S*/)?bench/(\w+)\.py\b([^\n]*)")
# In the docs' code a bench file is also cited without `python` (`bench/pipeline.py --phases gate`).
CITATION = re.compile(r"(?<![\w/.-])(?:python3?\s+)?(?:\S*/)?bench/(\w+)\.py\b([^\n]*)")
# Where a command line ends: a shell comment, pipe, list or redirection.
END_OF_COMMAND = re.compile(r"^(#|\||&&|\|\||;|\d?>)")
FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.M | re.S)


def run_bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@functools.cache
def help_of(script: str) -> subprocess.CompletedProcess:
    return run_bench(script, "--help", timeout=120)


def accepted_flags(script: str) -> dict[str, set[str] | None]:
    """The long options in the usage block of the script's --help (argparse lists every one there),
    each with its choices where it has some."""
    out = help_of(script)
    assert out.returncode == 0, out.stderr[-2000:]
    usage = out.stdout.split("\n\n", 1)[0]
    flags: dict[str, set[str] | None] = {f: None for f in re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", usage)}
    for flag, choices in re.findall(r"(--[\w-]+) \{([^}]*)\}", usage):
        flags[flag] = set(choices.split(","))
    return flags


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group())


def cited_commands() -> list[tuple[str, str, list[str]]]:
    """(where, file, arguments) of every `python bench/X.py ...` or `bench/X.py ...` in the docs'
    code: fenced blocks and inline code spans (which may wrap onto the next line); and of every
    `python bench/X.py ...` in the scripts' docstrings."""
    found = []
    for path in DOCS:
        text = path.read_text()
        pieces = [(m.start(), m.group().replace("\\\n", "  ")) for m in FENCE.finditer(text)]
        outside = FENCE.sub(_blank, text)
        pieces += [(m.start(), m.group().replace("\n", " ")) for m in re.finditer(r"`[^`]+`", outside)]
        for start, piece in pieces:
            for m in CITATION.finditer(piece):
                line = text.count("\n", 0, start + m.start()) + 1
                found.append((f"{path.name}:{line}", m.group(1), m.group(2).strip("`").split()))
    for script in SCRIPTS:
        text = (BENCH / f"{script}.py").read_text()
        doc = text.split('"""', 2)[1] if text.startswith('"""') else ""
        for m in COMMAND.finditer(doc):
            found.append((f"bench/{script}.py docstring", m.group(1), m.group(2).split()))
    commands = []
    for where, script, tokens in found:
        args = []
        for token in tokens:
            if END_OF_COMMAND.match(token):
                break
            args.append(token)
        commands.append((where, script, args))
    return commands


CITED = cited_commands()


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> Path:
    """A data root holding lag-dev/ in the LAG layout: 6 identities, one adult and one young 100x100
    photo each, cut tightly around the face of scikit-image's astronaut (public domain) with a
    different crop, side and brightness per photo. Six identities put faces on both sides of
    fit_box_mapping's split by name."""
    import cv2
    from skimage import data

    astronaut = data.astronaut()
    root = tmp_path_factory.mktemp("data")
    for i in range(6):
        for young in (False, True):
            k = 2 * i + young
            side = 150 + 6 * (k % 4)
            x, y = 160 + 3 * (k % 3), 35 + 2 * (k % 5)
            face = astronaut[y : y + side, x : x + side][:, :: -1 if k % 2 else 1]
            face = cv2.resize(np.ascontiguousarray(face), (100, 100), interpolation=cv2.INTER_AREA)
            face = np.clip(face * (0.8 + 0.05 * (k % 5)), 0, 255).astype(np.uint8)
            folder = root / "lag-dev" / f"person_{i}" / ("y" if young else "")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{k}.png"), face[:, :, ::-1])
    return root


def test_every_bench_file_is_a_script_or_a_module():
    for path in BENCH.glob("*.py"):
        runs = '__name__ == "__main__"' in path.read_text()
        assert runs == (path.stem not in MODULES), f"{path.name}: a script needs a __main__ block, a module none"
    assert {run.split()[0] for run in SMOKE} == set(SCRIPTS), "every script needs a smoke run"


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(f"bench.{module}" if module != "__init__" else "bench")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = help_of(script)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")


@pytest.mark.parametrize("run", sorted(SMOKE))
def test_smoke_run(run, fake_data, tmp_path):
    script = run.split()[0]
    if script in NEEDS_MOSQUITTO:
        from testing.broker import find_mosquitto

        if find_mosquitto() is None:
            missing_service("needs mosquitto (apt-get install -y mosquitto)")
    out_json = tmp_path / "out.json"
    args = SMOKE[run].format(data=fake_data, lag=fake_data / "lag-dev", json=out_json, tmp=tmp_path).split()
    out = run_bench(script, *args)
    assert out.returncode == 0, f"python bench/{script}.py {' '.join(args)}\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    results = json.loads(out_json.read_text())
    assert "machine" in results, f"bench/{script}.py's JSON does not name the machine (bench.machine.describe_machine)"
    machine = results["machine"]
    assert machine["cpu"] and machine["arch"] and machine["onnxruntime"]
    assert machine["cpu_features"] == describe_machine()["cpu_features"]


def test_the_docs_cite_bench_commands():
    """The parser below finds what it checks: README's own citations among them."""
    where = {w.split(":")[0] for w, _, _ in CITED}
    assert "README.md" in where and len(CITED) > 40
    assert any(s == "int8_accuracy" and "--calibration" in a for _, s, a in CITED)


@pytest.mark.parametrize(("where", "script", "args"), CITED, ids=[f"{w} {s}" for w, s, _ in CITED])
def test_cited_command_uses_only_existing_flags(where, script, args):
    assert (BENCH / f"{script}.py").is_file(), f"{where} cites bench/{script}.py, which does not exist"
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if not flags and script in MODULES:
        return  # a module named, not run
    assert script in SCRIPTS, f"{where} runs bench/{script}.py, which is a module, not a script"
    accepted = accepted_flags(script)
    unknown = sorted(flags - set(accepted))
    assert not unknown, f"{where}: python bench/{script}.py {' '.join(args)} -- no such option {unknown}"
    for i, arg in enumerate(args):
        choices = accepted.get(arg)
        if choices is None:
            continue
        values = []
        for value in args[i + 1 :]:
            if value.startswith("--"):
                break
            values.append(value)
        wrong = [v for v in values if v not in choices and v != "..."]
        assert not wrong, f"{where}: {arg} takes one of {sorted(choices)}, not {wrong}"


def test_cpu_model_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu avx2\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0c\n\nModel\t\t: Raspberry Pi 5\n")
    assert cpu_model(x86) == "Intel(R) Xeon(R) Gold 6338"
    assert cpu_model(arm) == "Raspberry Pi 5"
    assert cpu_model(tmp_path / "missing")  # falls back to what Python knows, never empty


def test_machine_summary_names_cpu_features_and_onnxruntime():
    machine = describe_machine()
    line = machine_summary(machine)
    assert machine["cpu"] in line and f"onnxruntime {machine['onnxruntime']}" in line
    assert all(f in line for f in machine["cpu_features"])
