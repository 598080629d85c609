"""Camera input for the unit: URL handling, frame sources (PyAV, OpenCV, GStreamer) and the capture thread."""
