"""How the unit's process is set up: its log (text for systemd's journal, or JSON lines) and glibc's
memory (freed frames go back to the OS)."""

from __future__ import annotations

import ctypes
import json
import logging
import sys
from typing import Any

from edge.config import LoggingConfig

# glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, thread, and any `figures` attached."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        figures = getattr(record, "figures", None)
        if figures is not None:
            out["figures"] = figures
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(cfg: LoggingConfig) -> None:
    """Set up the root logger: text (systemd's journal adds the time) or JSON lines, to stderr."""
    handler = logging.StreamHandler()
    if cfg.format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(cfg.level)


def tune_malloc(threshold: int = 128 * 1024) -> bool:
    """Have glibc serve blocks above `threshold` bytes by mmap, so freed frames go back to the OS.

    By default glibc raises its mmap threshold after the first large block is freed (up to 32 MB);
    after that, decoded frames (2-3 MB each) come from the heaps of the many threads that allocate
    and free them, which fragment: with 4 cameras the unit's RSS grew by about 1 MB/s without end
    (`python bench/pipeline.py --phases none --soak-minutes 5`). A fixed threshold keeps it flat.
    Returns False where there is no glibc `mallopt` (other C libraries manage memory their own way).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
