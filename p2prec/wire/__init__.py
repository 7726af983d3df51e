"""The wire format: msgpack header plus raw tensor frames, and validation of untrusted bytes.

Nothing that crosses the wire is ever pickled; see :mod:`p2prec.wire.message` for the
schema and :mod:`p2prec.wire.validate` for what a received message is guaranteed to be.
"""

from p2prec.wire.message import (
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Message,
    MessageType,
    Scalar,
    encode,
    wire_dtype_tag,
)
from p2prec.wire.validate import WireError, WireSpec, validate_and_decode

__all__ = [
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "Message",
    "MessageType",
    "Scalar",
    "WireError",
    "WireSpec",
    "encode",
    "validate_and_decode",
    "wire_dtype_tag",
]
