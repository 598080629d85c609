"""What a test does when something it needs is missing: a service (Mosquitto, the RTSP server,
PostgreSQL, Chromium), or a model or face the engine must find.

Each skips on a developer's machine, where the thing may simply not be installed; under CI
(CI=true) each fails instead, since CI installs every service and builds every model (.ci/run):
there a skip would hide a broken install or a regression behind a passing run."""

from __future__ import annotations

import os

import pytest


def _skip_or_fail(reason: str, under_ci: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: {under_ci})", pytrace=False)
    pytest.skip(reason)


def missing_service(reason: str) -> None:
    """Skip the test with `reason`; under CI fail it instead."""
    _skip_or_fail(reason, "CI must install and start every service the tests use")


def missing_model(reason: str) -> None:
    """Skip the test with `reason` (a model not built, its weights not installed, a face the engine
    does not find); under CI fail it instead: CI installs the weights and runs `engines build`, so
    there the model is present and a face it no longer finds is a regression of the detector."""
    _skip_or_fail(reason, "CI installs and builds every model the tests use, so this is a regression, not an absence")
