"""The errors of the wire format."""


class ProtocolError(ValueError):
    """A topic or payload does not follow checkpoint protocol v1."""


class RecordError(ValueError):
    """A record was built with a value of the wrong shape, type or range."""
