"""Where hits go: one small interface, several sinks (MQTT reporter, JSON-lines file)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from pydantic import Field

from common.config import StrictModel
from wire import records
from wire.records import Hit


class SinkError(Exception):
    """A sink could not keep a hit (the message names the sink, the hit and the cause)."""


@runtime_checkable
class HitSink(Protocol):
    """Takes hits from the pipeline. `submit` must not block on the network: a sink that sends
    over a network persists the hit first and sends from its own thread."""

    name: str

    def submit(self, hit: Hit) -> None:
        """Accept one hit; raise only if the hit could not be kept at all."""

    def stats(self) -> dict[str, int | float | str]:
        """Figures for the unit's heartbeat and logs (for example pending, sent, dropped)."""

    def close(self, timeout: float = 5.0, reason: str = "shutdown") -> None:
        """Flush what can be flushed within `timeout` seconds and release resources. `reason`: why
        the unit stops, for a sink that tells the centre (the MQTT reporter's 'offline' status)."""


class JsonlSinkConfig(StrictModel):
    """A JSON-lines file of hits (``[sinks.jsonl]`` in the unit config)."""

    path: Path = Field(description="file the hits are appended to, one JSON object per line")
    include_crop: bool = Field(
        True, description='write the face crop as base64 JPEG (crop_jpeg_b64); off: crop_dropped is "not_kept"'
    )
    max_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="rotate the file when it grows past this size")
    backups: int = Field(3, ge=0, le=100, description="rotated files kept (path.1 ... path.N); older ones are deleted")


class JsonlSink:
    """Appends each hit as one JSON line to a file, flushed per hit; rotates by size.

    The file holds only hits (faces that matched the watchlist); rotation with a fixed number
    of backups bounds how much is kept.
    """

    name = "jsonl"

    def __init__(self, config: JsonlSinkConfig, site: str) -> None:
        self.config = config
        self.site = site
        self.path = Path(config.path)
        self._lock = threading.Lock()
        self._written = 0
        self._failed = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # (kept open until close)
        except OSError as exc:
            raise SinkError(f"jsonl sink: cannot open {self.path} for appending: {exc}") from exc

    def submit(self, hit: Hit) -> None:
        """Write the hit as one line and flush it to the OS."""
        # The same record as on MQTT (wire.records), so one schema and one parser serve both.
        crop = hit.crop_jpeg if self.config.include_crop else None
        dropped = "not_kept" if hit.crop_jpeg is not None and crop is None else None
        line = records.hit_payload(records.hit_record(hit, self.site), crop, dropped).decode() + "\n"
        with self._lock:
            if self._fh is None:
                raise SinkError(f"jsonl sink: {self.path} is closed; hit {hit.id} not written")
            try:
                fh = self._fh
                if fh.tell() + len(line) > self.config.max_bytes and fh.tell() > 0:
                    fh.close()
                    self._fh = None
                    self._rotate()
                    fh = self._fh = open(self.path, "a", encoding="utf-8")
                fh.write(line)
                fh.flush()
            except OSError as exc:
                self._failed += 1
                raise SinkError(f"jsonl sink: cannot write hit {hit.id} to {self.path}: {exc}") from exc
            self._written += 1

    def stats(self) -> dict[str, int | float | str]:
        """Hits written and failed, and the file written to."""
        return {"written": self._written, "failed": self._failed, "path": str(self.path)}

    def close(self, timeout: float = 5.0, reason: str = "shutdown") -> None:
        """Flush and fsync the file, then close it."""
        with self._lock:
            if self._fh is None:
                return
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:
                self._fh.close()
                self._fh = None

    def _rotate(self) -> None:
        if self.config.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.config.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


class MemorySink:
    """Keeps hits in a list (`hits`) and sends them nowhere: for `edge analyse`, tests and benchmarks."""

    name = "memory"

    def __init__(self) -> None:
        self.hits: list[Hit] = []

    def submit(self, hit: Hit) -> None:
        """Keep the hit."""
        self.hits.append(hit)

    def stats(self) -> dict[str, int | float | str]:
        """How many hits were kept."""
        return {"hits": len(self.hits)}

    def close(self, timeout: float = 5.0, reason: str = "shutdown") -> None:
        """Nothing to flush."""
