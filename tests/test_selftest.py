"""The known-answer self-test (issue 18): the engine's networks and the matcher give their right answers
here, a kernel that saturates fails it, and `edge run`, `edge check-config --selftest` and HQ's
`watchlist enrol` refuse to go on with one (run as real commands in a child process whose kernel is
wrapped by tests/faulty_kernel_child.py)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edge.daemon import SELFTEST_FAILED
from edge.probe import unit_selftest
from engines.known_answers import ANSWERS_DIR, TOLERANCES, SelfTestError, check_engine, check_inputs, detector_model
from matching.selftest import MatcherSelfTestError, check_matcher
from tests.faulty_kernel_child import SaturatingBackend, SaturatingSession, saturated_pair_sums
from wire import records

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("faulty_kernel_child.py")


def _unit_config(tmp: Path) -> Path:
    (tmp / "hq-root.pub").write_text("0" * 64)
    (tmp / "clip.mp4").write_bytes(b"")
    path = tmp / "unit.toml"
    path.write_text(
        '[unit]\nid = "unit-s"\nsite = "site-s"\n\n[[cameras]]\nid = "cam"\nurl = "clip.mp4"\n\n'
        '[watchlist]\nroot_key = "hq-root.pub"\nstore = "wl.db"\n\n[sinks.jsonl]\npath = "hits.jsonl"\n'
    )
    return path


def _embedder_checks(engine: Any) -> tuple[str, ...]:
    """The embedder checks of `engine` in a report: "embedder" for one model, one per member of an ensemble
    (the default model is one: engines.ensemble.DEFAULT_MEMBERS)."""
    return ("embedder",) if len(engine.members) == 1 else tuple(f"embedder:{m.name}" for m in engine.members)


def _child(tmp: Path, fault: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), fault, *command], cwd=tmp, capture_output=True, text=True, timeout=240
    )


@pytest.mark.kernels
def test_the_engine_gives_its_stored_answers_here(engine: Any) -> None:
    report = check_engine(engine)
    assert report.checks == ("pnet", "rnet", "onet", *_embedder_checks(engine)) and report.skipped == ()
    tol = TOLERANCES[report.precision]
    assert max(report.worst[n] for n in ("pnet", "rnet", "onet")) <= tol.abs
    assert max(report.worst[n] for n in _embedder_checks(engine)) <= 1 - tol.cos


@pytest.mark.kernels
def test_check_inputs_are_the_recorded_ones_and_hold_the_worst_case() -> None:
    spec_size = (150, 150)
    inputs = check_inputs(spec_size)
    again = check_inputs(spec_size)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)
    harsh = inputs["embedder"][-1]
    assert (harsh == 0).mean() > 0.1 and (harsh == 255).mean() > 0.1
    plain = inputs["embedder"][0]
    assert 40 < plain.mean() < 216 and (plain == 0).mean() < 0.01
    import hashlib

    stored = {json.loads(p.read_text())["inputs_sha256"] for p in ANSWERS_DIR.glob("*.json")}
    # The detector's inputs, dlib's 150x150 chips and the npm embedders' 112x112 ones (engines/ensemble.py).
    chips112 = check_inputs((112, 112))["embedder"]
    made = {
        hashlib.sha256(b"".join(inputs[n].tobytes() for n in nets)).hexdigest()
        for nets in (("pnet", "rnet", "onet"), ("embedder",))
    } | {hashlib.sha256(chips112.tobytes()).hexdigest()}
    assert made == stored


def test_a_saturating_embedder_fails_naming_the_check_and_the_cpu(engine: Any) -> None:
    # The first member (dlib's ResNet; the model itself where there is one).
    member = engine.members[0].embedder
    real = member.backend
    member.backend = SaturatingBackend(real)
    try:
        with pytest.raises(SelfTestError) as err:
            check_engine(engine)
    finally:
        member.backend = real
    text = str(err.value)
    assert "embedder" in text and "cosine to the stored output" in text and "CPU features seen:" in text


def test_an_embedder_without_answers_is_named_and_the_rest_still_checked(
    engine: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    det = f"{detector_model(engine)}.json"
    shutil.copy(ANSWERS_DIR / det, tmp_path / det)
    with caplog.at_level(logging.INFO, logger="engines.known_answers"):
        report = check_engine(engine, tmp_path)
    assert report.checks == ("pnet", "rnet", "onet")
    assert [s.split(":", 1)[0] if engine.is_ensemble else s.split(" ", 1)[0] for s in report.skipped] == [
        "embedder"
    ] * len(engine.members)
    assert all(f" {m.model_id}: " in s for m, s in zip(engine.members, report.skipped))
    assert all(f"the {name} has no known answers" in caplog.text for name in _embedder_checks(engine))


@pytest.mark.kernels
@pytest.mark.parametrize("dim", [128, 129, 512])
def test_the_matcher_equals_brute_force_on_the_worst_case_index(dim: int) -> None:
    check = check_matcher(dim)
    assert check.worst_score_error < 1e-5 and check.templates > 256


def test_the_faulty_kernel_clips_pair_sums_as_vpmaddubsw_does() -> None:
    a = np.array([[255, 255, 10, 10, 255]], np.uint8)
    b = np.array([[127], [127], [127], [127], [-128]], np.int8)
    # The first pair sums to 64770 and is held at 32767; the others fit in int16.
    assert saturated_pair_sums(a, b).tolist() == [[32767 - 64770]]


def test_a_saturating_coarse_pass_fails_the_matcher_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    real = onnxruntime.InferenceSession

    def session(*args: Any, **kwargs: Any) -> Any:
        s = real(*args, **kwargs)
        return SaturatingSession(s) if s.get_outputs()[0].type == "tensor(int32)" else s

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    with pytest.raises(MatcherSelfTestError) as err:
        check_matcher(129, cpu_features=["avx2"])
    assert "expected top 5" in str(err.value) and "CPU features seen: avx2" in str(err.value)


@pytest.mark.parametrize("fault", ["matcher", "embedder"])
def test_edge_run_refuses_to_start_on_a_faulty_kernel(tmp_path: Path, fault: str) -> None:
    conf = _unit_config(tmp_path)
    done = _child(tmp_path, fault, "edge", "run", "--config", str(conf))
    assert done.returncode == SELFTEST_FAILED, done.stderr
    assert "the unit refuses to start: " in done.stderr and "CPU features seen:" in done.stderr
    service = (REPO / "systemd" / "checkpoint-edge.service").read_text()
    prevent = next(line for line in service.splitlines() if line.startswith("RestartPreventExitStatus="))
    assert str(SELFTEST_FAILED) in prevent.split("=", 1)[1].split()


def test_a_unit_that_refuses_to_start_tells_the_centre_why(tmp_path: Path, mosquitto: Any) -> None:
    """No silent failure: the retained 'offline' status carries the self-test's reason, and the
    centre (a real receiver on the broker) shows it, for the unit's journal is not at the centre."""
    from central.cli import main as receiver_cli
    from central.receiver import Receiver, ReceiverConfig
    from central.store import HitStore
    from testing.broker import wait_for

    store = HitStore(tmp_path / "centre.sqlite")
    receiver = Receiver(
        ReceiverConfig(host=mosquitto.host, port=mosquitto.port, client_id="test-centre", reconnect_min_delay_s=0.1),
        store,
    )
    receiver.start()
    try:
        wait_for(receiver.subscribed.is_set, what="the receiver subscribed")
        conf = _unit_config(tmp_path)
        conf.write_text(
            conf.read_text() + f'\n[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n\n'
            '[outbox]\npath = "outbox.sqlite"\n'
        )
        done = _child(tmp_path, "matcher", "edge", "run", "--config", str(conf))
        assert done.returncode == SELFTEST_FAILED, done.stderr
        unit = wait_for(
            lambda: next((u for u in store.units() if u["unit_id"] == "unit-s" and u["state"] == "offline"), None),
            what="unit-s offline at the centre",
        )
    finally:
        receiver.close()
        store.close()
    reason = unit["state_reason"]
    assert reason.startswith("the unit refuses to start: matcher known-answer test failed"), reason
    assert "CPU features seen:" in reason and "\n" not in reason
    listed = CliRunner().invoke(receiver_cli, ["units", "--db", str(tmp_path / "centre.sqlite")])
    assert listed.exit_code == 0, listed.output
    assert "site-s/unit-s" in listed.output and "the unit refuses to start: matcher known-answer" in listed.output


def test_check_config_runs_the_selftest_and_reports_a_failure(tmp_path: Path, engine: Any) -> None:
    from edge.cli import main

    conf = _unit_config(tmp_path)
    ok = CliRunner().invoke(main, ["check-config", "--selftest", str(conf)])
    assert ok.exit_code == 0, ok.output
    checks = ", ".join(("pnet", "rnet", "onet", *_embedder_checks(engine), "matcher"))
    assert f"self-test: OK: right answers from {checks}" in ok.output
    bad = _child(tmp_path, "matcher", "edge", "check-config", "--selftest", str(conf))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "self-test: FAILED: matcher known-answer test failed" in bad.stdout


def test_hq_enrol_refuses_on_a_faulty_kernel(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    done = _child(tmp_path, "embedder", "watchlist", "enrol", str(photos), "--register", str(tmp_path / "hq.db"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: known-answer test failed: embedder" in done.stderr
    assert not (tmp_path / "hq.db").exists()


def test_the_heartbeat_carries_the_selftest(engine: Any, payload_schemas: dict[str, Any]) -> None:
    from testing.hits import schema_errors

    result = unit_selftest(engine)
    assert result["passed"] and result["checks"][-1] == "matcher" and result["duration_s"] > 0
    outbox = {k: 0 for k in records.HEARTBEAT_OUTBOX_KEYS} | {"max_bytes": 1024}
    link = {"state": "connected", "connects": 1, "connect_attempts": 1, "last_error": None}
    payload = records.heartbeat_payload(
        "site-a", "unit-1", interval_s=30, uptime_s=5, unit={"selftest": result}, outbox=outbox, link=link
    )
    assert records.decode_heartbeat(payload)["unit"]["selftest"] == result
    assert schema_errors(json.loads(payload), payload_schemas["heartbeat"]) == []
    wrong = json.loads(payload)
    wrong["unit"]["selftest"]["passed"] = "yes"
    assert schema_errors(wrong, payload_schemas["heartbeat"])


def test_a_started_unit_reports_its_selftest_in_its_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge.config import load_config
    from edge.daemon import Daemon
    from edge.notify import Notifier
    from engines.cpu import cpu_features

    daemon = Daemon(load_config(_unit_config(tmp_path)), notifier=Notifier(environ={}))
    with caplog.at_level(logging.INFO, logger="edge.probe"):
        daemon.start()
    try:
        st = daemon.status()["selftest"]
    finally:
        daemon.stop()
    checks = ["pnet", "rnet", "onet", *_embedder_checks(daemon.engine), "matcher"]
    assert st["passed"] and st["checks"] == checks and st["unchecked"] == []
    assert st["precision_fallback"] is None and st["cpu_features"] == cpu_features()
    line = next(r.getMessage() for r in caplog.records if "known-answer self-test passed" in r.getMessage())
    assert "CPU features:" in line
