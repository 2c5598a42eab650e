"""Errors of the wire layer."""


class ProtocolError(Exception):
    """The peer sent something that is not a valid potluck message (garbage, bad header, bad tensor)."""


class TensorLimitError(ProtocolError):
    """A tensor breaks the receiver's limits (dtype, rank, element count, byte size)."""


class StreamClosed(Exception):
    """The peer closed the stream cleanly before the first byte of a frame (not garbage: no more messages).

    Deliberately not a ProtocolError, so ``except ProtocolError`` does not swallow an ordinary close.
    """
