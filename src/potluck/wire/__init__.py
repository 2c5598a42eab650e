"""potluck.wire: typed messages, tensor wire format and stream framing (no pickle anywhere).

Typical use on a stream::

    await write_message(writer, InferenceStep(step_id=0, position=0), [hidden], compression="fp16")
    msg, tensors = await read_message(reader, timeout=30)
"""

from potluck.wire.compression import COMPRESSIONS, INT8_BLOCK_SIZE
from potluck.wire.errors import ProtocolError, StreamClosed, TensorLimitError
from potluck.wire.framing import (
    DEFAULT_CHUNK_SIZE,
    MAGIC,
    decode_message,
    encode_message,
    read_message,
    write_message,
)
from potluck.wire.messages import (
    MESSAGE_TYPES,
    BackwardRequest,
    BackwardResult,
    CloseInference,
    Compression,
    ErrorCode,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    LoraInfo,
    Message,
    OpenInference,
    SessionId,
    Tuning,
    parse_message,
)
from potluck.wire.protocols import (
    PROTOCOL_BACKWARD,
    PROTOCOL_FORWARD,
    PROTOCOL_INFERENCE,
    PROTOCOL_INFO,
    PROTOCOL_PUSH,
)
from potluck.wire.push import PushAccepted, PushConfig, PushHello, PushTarget
from potluck.wire.tensors import (
    DEFAULT_LIMITS,
    WIRE_DTYPES,
    TensorMeta,
    WireLimits,
    check_meta,
    decode_tensor,
    encode_tensor,
)

__all__ = [
    "PROTOCOL_BACKWARD",
    "PROTOCOL_FORWARD",
    "PROTOCOL_INFERENCE",
    "PROTOCOL_INFO",
    "PROTOCOL_PUSH",
    "PushAccepted",
    "PushConfig",
    "PushHello",
    "PushTarget",
    "LoraInfo",
    "Tuning",
    "COMPRESSIONS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LIMITS",
    "INT8_BLOCK_SIZE",
    "MAGIC",
    "MESSAGE_TYPES",
    "WIRE_DTYPES",
    "BackwardRequest",
    "BackwardResult",
    "CloseInference",
    "Compression",
    "ErrorCode",
    "ErrorReply",
    "ForwardRequest",
    "ForwardResult",
    "InferenceOpened",
    "InferenceStep",
    "InferenceStepResult",
    "InfoRequest",
    "InfoResponse",
    "Message",
    "OpenInference",
    "ProtocolError",
    "SessionId",
    "StreamClosed",
    "TensorLimitError",
    "TensorMeta",
    "WireLimits",
    "check_meta",
    "decode_message",
    "decode_tensor",
    "encode_message",
    "encode_tensor",
    "parse_message",
    "read_message",
    "write_message",
]
