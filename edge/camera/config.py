"""One camera's settings (``[[cameras]]`` keys): where to read it, with which backend, how patiently."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.config import StrictModel
from edge.camera.urls import UrlError, classify_url


class CaptureConfig(StrictModel):
    """One camera: where to read it, with which backend, and how patiently."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="camera id used in logs and hits")
    url: str | int = Field(description="rtsp://, rtsps://, a video file path, /dev/videoN or a camera index")
    # pyav by default: OpenCV opens streams one at a time process-wide, so one hanging camera would
    # hold up the others' reconnects (docs/capture.md).
    backend: Literal["opencv", "pyav", "gstreamer"] = "pyav"
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(10.0, gt=0, le=300)
    read_timeout_s: float = Field(5.0, gt=0, le=300)
    stall_timeout_s: float = Field(5.0, gt=0, le=300)
    reconnect_min_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    width: int | None = Field(None, ge=16, le=8192, description="resize frames to this width")
    height: int | None = Field(None, ge=16, le=8192, description="resize frames to this height")
    realtime: bool = Field(True, description="files: play at their native rate; false = as fast as decoded")
    loop: bool = Field(False, description="files: start over at the end instead of finishing")
    # GStreamer backend (Jetson hardware decode); see docs/capture.md.
    codec: Literal["h264", "h265"] = "h264"
    gst_decoder: str = Field("nvv4l2decoder", pattern=r"^[A-Za-z0-9_-]+$")
    gst_latency_ms: int = Field(200, ge=0, le=10000)
    gst_pipeline: str | None = Field(None, description="full pipeline ending in appsink; overrides the built one")

    @field_validator("url", mode="before")
    @classmethod
    def _check_url(cls, v: object) -> str | int:
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ValueError(f"must be a string or a camera index, got {type(v).__name__}")
        try:
            _kind, normal = classify_url(v)
        except UrlError as e:
            raise ValueError(str(e)) from None
        return normal

    @model_validator(mode="after")
    def _check_relations(self) -> CaptureConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s:g}) must not exceed reconnect_max_s ({self.reconnect_max_s:g})"
            )
        if self.gst_pipeline is not None and self.backend != "gstreamer":
            raise ValueError('gst_pipeline is only used with backend = "gstreamer"')
        if self.gst_pipeline is not None and "appsink" not in self.gst_pipeline:
            raise ValueError("gst_pipeline must end in an appsink (OpenCV reads frames from it)")
        return self

    @property
    def kind(self) -> str:
        """rtsp, file or v4l2."""
        return classify_url(self.url)[0]
