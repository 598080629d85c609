"""What a test does when a service it needs (Mosquitto, the RTSP server, PostgreSQL, Chromium) is missing."""

from __future__ import annotations

import os

import pytest


def missing_service(reason: str) -> None:
    """Skip the test with `reason`; under CI (CI=true) fail it instead, since CI installs every service."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: CI must install and start every service the tests use)", pytrace=False)
    pytest.skip(reason)
