"""Camera URLs: which kind of source a URL names (RTSP, file, V4L2), and how to show one without its password."""

from __future__ import annotations

import os
import re
from typing import Literal
from urllib.parse import urlsplit

SourceKind = Literal["rtsp", "file", "v4l2"]

_DEV_VIDEO = re.compile(r"^/dev/video(\d+)$")


class UrlError(ValueError):
    """A camera URL is not one of the accepted forms."""


def classify_url(url: str | int) -> tuple[SourceKind, str | int]:
    """Sort a camera URL into rtsp / file / v4l2 and normalise it.

    Accepted: rtsp://host[:port]/path, rtsps://..., a video file path (or file://path),
    /dev/videoN, or a camera index (0, "0"). Raises UrlError naming what is wrong.
    """
    if isinstance(url, bool):
        raise UrlError(f"camera url must be a string or a camera index, got {url!r}")
    if isinstance(url, int):
        if url < 0:
            raise UrlError(f"camera index must be >= 0, got {url}")
        return "v4l2", url
    text = url.strip()
    if not text:
        raise UrlError("camera url is empty: give rtsp://host/path, a video file path, /dev/videoN or a camera index")
    if text.isdigit():
        return "v4l2", int(text)
    if _DEV_VIDEO.match(text):
        return "v4l2", text
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("rtsp", "rtsps"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise UrlError(f"camera url {redact_url(text)!r} has no host: use {scheme}://HOST[:PORT]/PATH")
        try:
            _ = parts.port  # urlsplit checks the port only when asked for it
        except ValueError:
            raise UrlError(f"camera url {redact_url(text)!r} has a bad port number") from None
        return "rtsp", text
    if scheme == "file":
        text = text[len("file://") :]
    elif scheme:
        raise UrlError(
            f"camera url scheme {scheme!r} is not supported: use rtsp://, rtsps://, a video file path, "
            "/dev/videoN or a camera index"
        )
    if text.startswith("/dev/"):
        raise UrlError(f"camera device {text!r} is not a V4L2 capture device path: use /dev/videoN")
    if not os.path.isfile(text):
        raise UrlError(f"video file {text!r} does not exist (or is not a file)")
    return "file", text


_CREDENTIALS = re.compile(r"(://[^/\s:@]*:)[^/\s]*@")


def redact_url(text: str | int) -> str:
    """`text` (a URL, or a pipeline holding one) with any password replaced by ***, fit for logs and status."""
    return _CREDENTIALS.sub(r"\1***@", str(text))
