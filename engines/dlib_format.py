"""Reader for dlib's binary serialisation format (dlib/serialize.h), so that dlib's model files
can be converted without building dlib.

Integers are a control byte (low nibble: byte count, bit 7: sign) followed by little-endian
magnitude bytes. Floating-point numbers are two such integers, mantissa and base-2 exponent.
Strings are a length integer and raw bytes; booleans are the characters '1' and '0'.
"""

from __future__ import annotations

import builtins

import numpy as np

from engines.errors import ModelError

# dlib's float_details marks non-finite values with reserved exponents.
_EXP_INF = 32000
_EXP_NINF = 32001
_EXP_NAN = 32002


class DlibReader:
    """Sequential reader over the bytes of a dlib-serialised object."""

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.source = source

    def _fail(self, what: str) -> ModelError:
        return ModelError(
            f"{self.source}: corrupt or unsupported dlib model file ({what} at byte {self.pos}); "
            "reinstall the package that ships it (pip install --force-reinstall face_recognition_models)"
        )

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail(f"file ends early: wanted {n} bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def peek_byte(self, offset: int = 0) -> int:
        if self.pos + offset >= len(self.data):
            raise self._fail("file ends early")
        return int(self.data[self.pos + offset])

    def int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise self._fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        if exponent == _EXP_INF:
            return float("inf")
        if exponent == _EXP_NINF:
            return float("-inf")
        if exponent == _EXP_NAN:
            return float("nan")
        return float(mantissa) * 2.0**exponent

    def bool(self) -> bool:
        ch = self._take(1)[0]
        if ch not in (0x30, 0x31):
            raise self._fail(f"bad boolean byte 0x{ch:02x}")
        return ch == 0x31

    def string(self, max_len: builtins.int = 4096) -> str:
        n = self.int()
        if not 0 <= n <= max_len:
            raise self._fail(f"implausible string length {n}")
        try:
            return bytes(self._take(n)).decode("ascii")
        except UnicodeDecodeError as exc:
            raise self._fail("string is not ASCII") from exc

    def peek_string(self) -> str | None:
        """The string that starts here if one plausibly does (a layer name), else None."""
        save = self.pos
        try:
            n = self.int()
            if not 3 <= n <= 64:
                return None
            raw = bytes(self._take(n))
            if not all(48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 95 for c in raw):
                return None
            return raw.decode("ascii")
        except ModelError:
            return None
        finally:
            self.pos = save

    def float_vector(self) -> np.ndarray:
        """std::vector<float> serialised element by element."""
        n = self.int()
        if not 0 <= n <= 50_000_000:
            raise self._fail(f"implausible vector length {n}")
        return np.array([self.float() for _ in range(n)], dtype=np.float32)

    def float_matrix(self) -> np.ndarray:
        """dlib::matrix<float|double>: rows and columns (stored negated by newer dlib), then elements."""
        nr = self.int()
        nc = self.int()
        if nr < 0 or nc < 0:
            nr, nc = -nr, -nc
        if nr * nc > 50_000_000:
            raise self._fail(f"implausible matrix size {nr}x{nc}")
        vals = [self.float() for _ in range(nr * nc)]
        return np.array(vals, dtype=np.float64).reshape(nr, nc)

    def dnn_tensor(self) -> np.ndarray:
        """dlib::resizable_tensor (version 2): shape ints then raw little-endian float32 data."""
        version = self.int()
        if version != 2:
            raise self._fail(f"unsupported tensor version {version}")
        n, k, nr, nc = (self.int() for _ in range(4))
        count = n * k * nr * nc
        if min(n, k, nr, nc) < 0 or count > 100_000_000:
            raise self._fail(f"implausible tensor shape {(n, k, nr, nc)}")
        raw = self._take(4 * count)
        return np.frombuffer(bytes(raw), dtype="<f4").reshape(n, k, nr, nc).astype(np.float32)

    def alias_tensor(self) -> tuple[builtins.int, builtins.int, builtins.int, builtins.int]:
        version = self.int()
        if version != 1:
            raise self._fail(f"unsupported alias_tensor version {version}")
        n, k, nr, nc = (self.int() for _ in range(4))
        return n, k, nr, nc
