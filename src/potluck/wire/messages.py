"""Typed protocol messages exchanged between clients and servers.

Every message is a frozen pydantic model with a literal ``kind``; the framing layer (``framing.py``) writes
``kind`` plus the model's JSON as the frame header and the tensors as separate payloads. Parsing goes through
``parse_message`` which validates against the registered model for the kind: unknown kinds and malformed
fields are ``ProtocolError`` (never pickle, never eval).
"""

from __future__ import annotations

from typing import Annotated, Literal, NewType

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from potluck.wire.errors import ProtocolError

SessionId = NewType("SessionId", str)

Compression = Literal["none", "fp16", "bf16", "int8"]

_SMALL = Annotated[int, Field(ge=0, le=1 << 31)]


class Message(BaseModel):
    """Base of all wire messages: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraInfo(Message):
    """Client-owned LoRA adapters travelling with a request: the tensors follow the hidden states (and prompts)
    as, for each target in order, A ``[n_blocks, rank, in]`` then B ``[n_blocks, out, rank]``."""

    rank: Annotated[int, Field(ge=1, le=1024)]
    alpha: Annotated[float, Field(gt=0, le=1e6)]
    targets: Annotated[list[str], Field(min_length=1, max_length=16)]


class Tuning(Message):
    """What a request carries beyond hidden states. Tensor order: hidden, [grad_out], [prompts], [LoRA...]."""

    # deep prompts [n_blocks, B, P, H] added to the first P positions before each block
    has_prompts: bool = False
    lora: LoraInfo | None = None  # client-owned adapters
    active_adapter: Annotated[str, Field(max_length=128)] | None = None  # a server-preloaded adapter, by name


# --- info -------------------------------------------------------------------------------------------


class InfoRequest(Message):
    kind: Literal["info_request"] = "info_request"


class InfoResponse(Message):
    kind: Literal["info_response"] = "info_response"
    version: str
    model: str  # the DHT model prefix this server serves
    start: int  # first block held (inclusive)
    end: int  # last block held (exclusive)
    dtype: str  # torch dtype name of the blocks, e.g. "float32"
    cache_tokens_left: int  # free KV-cache room, in batch*tokens
    max_batch_tokens: int  # largest batch*tokens a single step or forward may carry
    max_inference_length: int  # largest max_length a session may ask for
    state: str  # "joining" | "online" | "offline"


# --- inference session (one long-lived stream per session) --------------------------------------------


class OpenInference(Message):
    """First message of an inference stream: reserve a KV cache for ``batch_size * max_length`` tokens."""

    kind: Literal["open_inference"] = "open_inference"
    model: str
    start: int  # sub-range of the server's span to run (absolute block indices)
    end: int
    max_length: _SMALL
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    alloc_timeout: Annotated[float, Field(ge=0, le=3600)] = 0.0  # wait this long for cache room, then fail
    output_compression: Compression = "none"
    tuning: Tuning = Tuning()  # prompts / adapters for the whole session: sent once with this message


class InferenceOpened(Message):
    kind: Literal["inference_opened"] = "inference_opened"
    session_id: str
    start: int
    end: int
    max_length: int


class InferenceStep(Message):
    """One step: tensors = [hidden [B, T, H]]. ``position`` is where these tokens start.

    position < the server's current length rolls the cache back first (replay from 0 after a failover,
    or speculative-decoding rollback); position > current length is an error.
    """

    kind: Literal["inference_step"] = "inference_step"
    step_id: _SMALL
    position: _SMALL
    hypo_ids: list[int] | None = None  # beam search: reorder the cache's batch rows before this step
    # left padding per row (prompts of different lengths): row b's first pads[b] positions are masked and
    # do not count for its rotary positions; None: no padding
    pads: list[int] | None = None
    # push (wire/push.py): after the step, send the output to the next server the client configured (and a copy
    # to the client); that server runs it as its own step with the same step_id, position, hypo_ids and pads
    push: bool = False
    # the client sent this step to the first server of its chain (relayed or pushed); a hint for batching only
    # (server/scheduler.py:gather_until): that server gathers a full decode batch of such steps, later
    # ones only a burst
    chain_start: bool = False


class InferenceStepResult(Message):
    kind: Literal["inference_step_result"] = "inference_step_result"
    step_id: int
    position: int  # cache length after the step
    # time from receiving the step to sending this reply (queue + compute), for RTT estimates
    server_ms: float = 0.0
    # a step sent with push=True whose output could not be pushed to the next server: why (the client then
    # sends the output on itself); None when pushed, or when the step was not a push
    push_error: Annotated[str, Field(max_length=512)] | None = None


class CloseInference(Message):
    kind: Literal["close_inference"] = "close_inference"


# --- forward / backward (training; no cache) ------------------------------------------------------------


class ForwardRequest(Message):
    """tensors = [hidden [B, T, H]] (+ [prompts [n, B, P, H]]) (+ LoRA tensors), see ``Tuning``."""

    kind: Literal["forward_request"] = "forward_request"
    model: str
    start: int
    end: int
    tuning: Tuning = Tuning()
    output_compression: Compression = "none"
    keep_activations: bool = False  # keep the autograd graph for a following backward (saves recomputing)


class ForwardResult(Message):
    kind: Literal["forward_result"] = "forward_result"
    activation_id: Annotated[str, Field(max_length=64)] | None = None  # set when activations were kept


class BackwardRequest(Message):
    """tensors = [hidden_in [B, T, H], grad_out [B, T, H]] (+ prompts) (+ LoRA tensors), see ``Tuning``."""

    kind: Literal["backward_request"] = "backward_request"
    model: str
    start: int
    end: int
    tuning: Tuning = Tuning()
    output_compression: Compression = "none"
    activation_id: Annotated[str, Field(max_length=64)] | None = None  # from the forward; else recompute


class BackwardResult(Message):
    """tensors = [grad_in [B, T, H]] (+ [grad_prompts]) (+ a gradient per LoRA tensor), as in the request."""

    kind: Literal["backward_result"] = "backward_result"


# --- errors ------------------------------------------------------------------------------------------


ErrorCode = Literal[
    "bad_request",  # malformed message, wrong shape/dtype/size: the client's fault, do not retry here
    "limit_exceeded",  # valid, but above this server's limits (max_length, batch*tokens): try a bigger server
    "unknown_adapter",  # the named active_adapter is not loaded here: try a server that announces it
    "wrong_span",  # the server does not hold the asked blocks (it moved or never did)
    "unknown_model",
    "cache_full",  # no KV-cache room within alloc_timeout
    "evicted",  # the session was idle while its client held more than its fair share of the cache: closed
    "overloaded",
    "draining",  # the server is shutting down or moving: go elsewhere
    "timeout",
    "internal",
]


class ErrorReply(Message):
    kind: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retryable: bool  # True when another server (or this one later) may succeed


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["kind"].default: cls
    for cls in (
        InfoRequest,
        InfoResponse,
        OpenInference,
        InferenceOpened,
        InferenceStep,
        InferenceStepResult,
        CloseInference,
        ForwardRequest,
        ForwardResult,
        BackwardRequest,
        BackwardResult,
        ErrorReply,
    )
}


def parse_message(kind: str, payload: object) -> Message:
    """Validate a decoded header into its message type; anything unexpected is a ProtocolError."""
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if not isinstance(payload, dict):
        raise ProtocolError(f"message {kind!r}: header must be an object")
    try:
        return cls.model_validate(payload)
    except ValidationError as e:
        raise ProtocolError(f"malformed {kind!r} message: {e.errors(include_url=False)}") from None
