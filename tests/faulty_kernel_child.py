"""Run one of the project's commands on a faulty kernel, for tests that must see a wrong answer refused.

    python tests/faulty_kernel_child.py matcher edge run --config unit.toml
    python tests/faulty_kernel_child.py embedder watchlist enrol photos/ --register hq.db

The fault wraps the real kernel, it does not replace it:

- `matcher`: every ONNX Runtime session with an integer output (the matcher's MatMulInteger coarse
  pass) has its sums clipped as MLAS's AVX2 kernel clips them: products of the operand bytes are
  added in pairs and each pair sum saturates at the int16 limits (vpmaddubsw), the rest is exact.
- `embedder`: the engine's embedder outputs are held within +-EMBEDDER_LIMIT, as a kernel whose
  accumulator saturates would hold them.

Nothing in the installed commands knows of this: the child patches them before calling their
click entry point, so the command runs as it does under systemd or at HQ.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

EMBEDDER_LIMIT = 0.2  # the default embedder's raw outputs reach about +-0.45 on the check chips


def saturated_pair_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What saturation takes from (M, K) x (K, N) integer products: for each output, the sum over pairs of
    K of (pair sum clipped to int16) - (pair sum), with the operands' byte values as their dtypes give them."""
    a64, b64 = a.astype(np.int64), b.astype(np.int64)
    if a64.shape[1] % 2:
        a64 = np.pad(a64, ((0, 0), (0, 1)))
        b64 = np.pad(b64, ((0, 1), (0, 0)))
    pairs = np.einsum("mjt,jtn->mjn", a64.reshape(a64.shape[0], -1, 2), b64.reshape(-1, 2, b64.shape[1]))
    return (np.clip(pairs, -32768, 32767) - pairs).sum(axis=1)


class SaturatingSession:
    """An onnxruntime.InferenceSession whose integer matrix product clips pair sums like vpmaddubsw."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._names = [i.name for i in session.get_inputs()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, output_names: Any, feeds: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> list[np.ndarray]:
        out = self._session.run(output_names, feeds, *args, **kwargs)
        a, b = (feeds[n] for n in self._names[:2])
        return [(out[0].astype(np.int64) + saturated_pair_sums(a, b)).astype(np.int32), *out[1:]]


class SaturatingBackend:
    """An engines Backend whose outputs are held within +-EMBEDDER_LIMIT."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.clip(v, -EMBEDDER_LIMIT, EMBEDDER_LIMIT) for k, v in self._backend.run(feeds).items()}


def install_matcher_fault() -> None:
    """Wrap every ONNX Runtime session with an int32 output in a SaturatingSession."""
    import onnxruntime

    real = onnxruntime.InferenceSession

    def session(*args: Any, **kwargs: Any) -> Any:
        s = real(*args, **kwargs)
        return SaturatingSession(s) if s.get_outputs()[0].type == "tensor(int32)" else s

    onnxruntime.InferenceSession = session


def install_embedder_fault() -> None:
    """Wrap the (first) embedder of every FaceEngine loaded in a SaturatingBackend."""
    from engines.face_engine import FaceEngine

    real = FaceEngine.load.__func__

    def load(cls: type, config: Any = None) -> Any:
        engine = real(cls, config)
        # The first member: the model itself, or dlib's ResNet in the default ensemble.
        member = engine.members[0].embedder
        member.backend = SaturatingBackend(member.backend)
        return engine

    FaceEngine.load = classmethod(load)


def main() -> None:
    fault, program, *args = sys.argv[1:]
    {"matcher": install_matcher_fault, "embedder": install_embedder_fault}[fault]()
    if program == "edge":
        from edge.cli import main as command
    elif program == "watchlist":
        from watchlist.cli import main as command
    else:
        from engines.cli import main as command
    command(args, prog_name=program)


if __name__ == "__main__":
    main()
