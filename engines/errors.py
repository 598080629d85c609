"""Named errors of the face engine; each message says what is wrong and what to do."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the face engine's errors."""


class ImageError(EngineError, ValueError):
    """An input image is unreadable, empty, or of the wrong type or shape."""


class BoxError(EngineError, ValueError):
    """Boxes given to the detector are not (x1, y1, x2, y2) rows of finite numbers."""


class ModelError(EngineError):
    """A model file is missing, corrupt, or does not match its description."""


class BackendError(EngineError):
    """An inference backend is unavailable or failed to run a model."""
