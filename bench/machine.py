"""The machine a benchmark ran on, as every bench's JSON records it.

A figure is only comparable with one from the same kind of CPU: ONNX Runtime's integer kernels
differ by instruction set (engines.cpu), and speed differs by model. So each bench records the CPU
model, its architecture, the integer-kernel features it reports and the ONNX Runtime version.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from engines.cpu import cpu_features

# /proc/cpuinfo keys naming the CPU: x86 first, then what ARM kernels print.
_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model")
# Distributions that ship the `onnxruntime` module.
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


def cpu_model(cpuinfo: Path | str = "/proc/cpuinfo") -> str:
    """The CPU's model name from `cpuinfo`, else what Python's platform module knows."""
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    fields = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in _MODEL_KEYS:
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine()


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version (without importing it), or None where none is installed."""
    for name in _ORT_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def describe_machine() -> dict:
    """CPU model, architecture, integer-kernel features, core count, OS, Python and ONNX Runtime."""
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cpu_features": cpu_features(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime_version(),
    }


def machine_summary(machine: dict) -> str:
    """One line for a bench's table header: `describe_machine()`'s CPU, features and ONNX Runtime."""
    features = " ".join(machine["cpu_features"]) or "no integer-kernel features reported"
    return (
        f"{machine['cpu']} ({machine['arch']}, {machine['cpus']} CPUs; {features}); "
        f"onnxruntime {machine['onnxruntime'] or 'not installed'}"
    )
