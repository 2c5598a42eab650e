"""The server's RPCs: info, inference sessions (one long-lived stream each), forward and backward.

Each handler validates everything a client sends before touching the model: a bad request gets an
``ErrorReply`` on that stream only and never reaches the compute thread or other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from potluck.models import BlockSpan, KVCache, LoraWeights
from potluck.server import metrics
from potluck.server.activations import ActivationCache
from potluck.server.cache_budget import CacheBudget, CacheFullError
from potluck.server.config import ServerConfig
from potluck.server.forward_chunks import ChunkedCompute
from potluck.server.push import PushHub, SessionPush
from potluck.server.runtime import (
    PRIORITY_BACKWARD,
    PRIORITY_FORWARD,
    PRIORITY_INFERENCE,
    Runtime,
)
from potluck.server.scheduler import StepScheduler
from potluck.server.sessions import SessionClosedError, SessionTable
from potluck.server.tuning import TuningError, TuningInputs, unpack_tuning
from potluck.wire import (
    BackwardRequest,
    BackwardResult,
    CloseInference,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    OpenInference,
    ProtocolError,
    PushConfig,
    StreamClosed,
    Tuning,
    WireLimits,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """The client's request is invalid; the message goes back to that client."""

    def __init__(self, message: str, code: str = "bad_request", retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.retryable = retryable


@dataclass
class ServerState:
    """What handlers share: the span, the compute thread, the cache budget, and lifecycle flags."""

    config: ServerConfig
    model_prefix: str
    span: BlockSpan
    runtime: Runtime
    budget: CacheBudget
    limits: WireLimits
    state: str = "joining"  # joining | online | offline (draining)
    in_flight: int = 0  # steps and forward/backward calls being computed now
    generation: int = 0  # bumped when the server moves to other blocks
    adapters: dict[str, LoraWeights] = field(default_factory=dict)  # preloaded PEFT adapters by name
    activations: ActivationCache = field(
        default_factory=ActivationCache
    )  # training forwards awaiting backward
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    push: PushHub | None = None  # server-to-server push (server/push.py); None: off, clients relay
    sessions: SessionTable = field(init=False)  # open inference sessions, their caches and budget shares
    scheduler: StepScheduler = field(init=False)  # batches ready steps of different sessions
    chunked: ChunkedCompute = field(init=False)  # forwards/backwards in pieces between inference steps

    def __post_init__(self) -> None:
        cfg = self.config
        peer_tokens = cfg.peer_cache_tokens
        if peer_tokens is None:  # half the budget, but always room for one session of the longest length
            peer_tokens = max(cfg.cache_tokens // 2, min(cfg.cache_tokens, cfg.max_inference_length))
        self.sessions = SessionTable(self.budget, peer_tokens, cfg.peer_sessions, cfg.evict_idle_after)
        self.scheduler = StepScheduler(
            self.compute,
            token_budget=cfg.step_token_budget,
            device=self.device,
            dtype=self.dtype,
            batch_wait=cfg.batch_wait_ms / 1000,
        )
        self.chunked = ChunkedCompute(
            self.compute, cfg.forward_chunk_tokens, self.device, self.dtype, self.activations
        )

    def close_sessions(self, code: str, message: str) -> int:
        """Close every open session now (a move or a drain): caches and budget are freed at once."""
        closed = self.sessions.close_all(code, message)
        if closed:
            logger.info("closed %d sessions (%s); cache budget now %d/%d used", closed, code, self.budget.used,
                        self.budget.capacity)  # fmt: skip
        return closed

    @property
    def hidden_size(self) -> int:
        return int(self.span.spec.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.span.dtype

    @property
    def device(self) -> torch.device:
        return self.span.device

    def info(self) -> InfoResponse:
        return InfoResponse(
            version=_version(),
            model=self.model_prefix,
            start=self.span.start,
            end=self.span.end,
            dtype=str(self.dtype).removeprefix("torch."),
            cache_tokens_left=self.budget.left,
            max_batch_tokens=self.config.max_batch_tokens,
            max_inference_length=self.config.max_inference_length,
            state=self.state,
        )

    async def compute(self, priority: int, fn: Callable[[], Any]) -> Any:
        self.in_flight += 1
        self.idle.clear()
        try:
            return await self.runtime.run(priority, fn)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    # --- validation --------------------------------------------------------------------------------

    def check_span(self, model: str, start: int, end: int) -> BlockSpan:
        if model != self.model_prefix:
            raise BadRequest(
                f"this server serves model {self.model_prefix!r}, not {model!r}", "unknown_model"
            )
        if self.state == "offline":
            raise BadRequest("server is draining: use another server", "draining", retryable=True)
        if not (self.span.start <= start < end <= self.span.end):
            raise BadRequest(
                f"blocks {start}:{end} are not within this server's span {self.span.start}:{self.span.end}",
                "wrong_span",
                retryable=True,
            )
        return self.span.slice(start, end)

    def check_hidden(self, tensor: torch.Tensor, what: str, batch: int | None = None) -> None:
        if tensor.ndim != 3 or tensor.shape[-1] != self.hidden_size:
            raise BadRequest(f"{what} must be [batch, tokens, {self.hidden_size}], got {list(tensor.shape)}")
        if not tensor.is_floating_point():
            raise BadRequest(f"{what} must be a floating tensor, got {tensor.dtype}")
        if batch is not None and tensor.shape[0] != batch:
            raise BadRequest(f"{what} has batch {tensor.shape[0]}, the session was opened for {batch}")
        if tensor.shape[0] * tensor.shape[1] > self.config.max_batch_tokens:
            raise BadRequest(
                f"{what} carries {tensor.shape[0] * tensor.shape[1]} batch*tokens, "
                f"above this server's max_batch_tokens {self.config.max_batch_tokens}",
                "limit_exceeded",
            )
        if tensor.shape[1] == 0:
            raise BadRequest(f"{what} has no tokens")


def _version() -> str:
    from potluck import __version__

    return __version__


SEND_TIMEOUT = 60.0  # a client that stops reading our reply for this long is dropped


async def _send(
    writer: asyncio.StreamWriter,
    msg: Message,
    tensors: list[torch.Tensor] | None = None,
    compression: str = "none",
) -> None:
    """Write one reply; a client that does not take it within SEND_TIMEOUT loses its stream."""
    async with asyncio.timeout(SEND_TIMEOUT):  # no extra task per reply, unlike wait_for
        await write_message(writer, msg, tensors or [], compression)


async def _reply_error(writer: asyncio.StreamWriter, code: str, message: str, retryable: bool) -> None:
    metrics.count_error(code)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await write_message(writer, ErrorReply(code=code, message=message, retryable=retryable))  # type: ignore[arg-type]


async def _guarded(writer: asyncio.StreamWriter, peer: str, what: str, body: Callable[[], Any]) -> None:
    """Run a handler body; turn every failure into an error reply to this client only."""
    try:
        await body()
    except BadRequest as e:
        logger.info("%s from %s refused: %s", what, peer[-8:], e)
        await _reply_error(writer, e.code, str(e), e.retryable)
    except ProtocolError as e:
        logger.info("%s from %s: bad message: %s", what, peer[-8:], e)
        await _reply_error(writer, "bad_request", str(e), False)
    except CacheFullError as e:
        await _reply_error(writer, "cache_full", str(e), True)
    except (StreamClosed, ConnectionError, asyncio.IncompleteReadError):
        logger.debug("%s from %s: stream closed", what, peer[-8:])
    except TimeoutError:
        logger.info("%s from %s timed out", what, peer[-8:])
        await _reply_error(writer, "timeout", f"{what}: timed out waiting for the client", True)
    except Exception as e:
        logger.exception("%s from %s failed", what, peer[-8:])
        await _reply_error(writer, "internal", f"{type(e).__name__}: {e}", True)


class Handlers:
    """The stream handlers registered on the server's node."""

    def __init__(self, state: ServerState):
        self.s = state

    async def info(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body() -> None:
            msg, _ = await read_message(reader, self.s.limits, timeout=30)
            if not isinstance(msg, InfoRequest):
                raise BadRequest(f"expected info_request, got {msg.kind}")  # type: ignore[attr-defined]
            await _send(writer, self.s.info())

        await _guarded(writer, peer, "info", body)

    # --- inference -----------------------------------------------------------------------------------

    async def inference(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _guarded(writer, peer, "inference", lambda: self._inference(peer, reader, writer))

    async def _inference(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.s.config
        msg, tensors = await read_message(reader, self.s.limits, timeout=cfg.step_timeout)
        if not isinstance(msg, OpenInference):
            raise BadRequest(f"an inference stream must start with open_inference, got {_kind(msg)}")
        span = self.s.check_span(msg.model, msg.start, msg.end)
        tuning = self._tuning(span, msg.tuning, tensors, batch=msg.batch_size, tokens=msg.max_length)
        if msg.max_length < 1:
            raise BadRequest(f"max_length must be at least 1, got {msg.max_length}")
        if msg.max_length > cfg.max_inference_length:
            raise BadRequest(
                f"max_length {msg.max_length} is above this server's max_inference_length "
                f"{cfg.max_inference_length}",
                "limit_exceeded",
            )
        alloc_timeout = min(msg.alloc_timeout, cfg.max_alloc_timeout)

        async def make_cache() -> KVCache:
            cache: KVCache = await self.s.compute(
                PRIORITY_INFERENCE, lambda: span.new_cache(msg.batch_size, msg.max_length)
            )
            return cache

        session = await self.s.sessions.open(
            peer=peer,
            span=span,
            batch_size=msg.batch_size,
            max_length=msg.max_length,
            tuning=tuning,
            adapter=msg.tuning.active_adapter,
            alloc_timeout=alloc_timeout,
            make_cache=make_cache,
        )
        metrics.count_request("inference")
        logger.info(
            "session %s from %s: blocks %d:%d, batch %d, max_length %d",
            session.id[:8], peer[-8:], msg.start, msg.end, msg.batch_size, msg.max_length,
        )  # fmt: skip
        if self.s.push is not None:
            entry = self.s.push.register(session, msg, writer)
        else:
            entry = SessionPush(session=session, opened=msg, client_writer=writer)
        try:
            await _send(
                writer,
                InferenceOpened(
                    session_id=session.id, start=msg.start, end=msg.end, max_length=msg.max_length
                ),
            )
            await self._steps(entry, reader)
        finally:
            self.s.sessions.close(session)  # frees the KV cache and its budget now
            if self.s.push is not None:
                self.s.push.unregister(entry)
            logger.info("session %s closed", session.id[:8])

    async def _steps(self, entry: SessionPush, reader: asyncio.StreamReader) -> None:
        cfg = self.s.config
        deadline = time.monotonic() + cfg.session_timeout
        while True:
            timeout = min(cfg.step_timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise BadRequest("session lifetime exceeded: open a new one", "timeout", retryable=True)
            try:
                msg, tensors = await read_message(reader, self.s.limits, timeout=timeout)
            except StreamClosed:
                return
            except TimeoutError:
                # with push, a server after the first gets its steps from the previous server, not this stream
                if time.monotonic() - entry.last_step_at < cfg.step_timeout:
                    continue
                raise
            if isinstance(msg, CloseInference):
                return
            if isinstance(msg, PushConfig):
                if self.s.push is not None:
                    self.s.push.configure(entry, msg)
                continue
            if not isinstance(msg, InferenceStep):
                raise BadRequest(f"expected inference_step, got {_kind(msg)}")
            if len(tensors) != 1:
                raise BadRequest(f"inference_step carries 1 tensor (hidden states), got {len(tensors)}")
            entry.last_step_at = time.monotonic()
            await self._step(entry, msg, tensors[0])

    async def _step(self, entry: SessionPush, msg: InferenceStep, hidden: torch.Tensor) -> None:
        """Run one step (from the client, or pushed by the previous server), push it on, answer the client."""
        session, opened = entry.session, entry.opened
        received = time.perf_counter()
        async with entry.step_lock:  # a pushed step and a client's step of one session never interleave
            cache = session.cache
            if cache is None:  # a move or a drain closed the session meanwhile
                code = session.closed.code if session.closed else "closed"
                raise BadRequest(str(session.closed), code, retryable=True)
            if self.s.state == "offline":
                raise BadRequest("server is draining: continue on another server", "draining", retryable=True)
            self.s.check_hidden(hidden, "hidden states", batch=opened.batch_size)
            num_new = hidden.shape[1]
            if msg.position > cache.length:
                raise BadRequest(
                    f"step at position {msg.position} but the session holds only {cache.length} tokens"
                )
            if msg.position + num_new > cache.max_length:
                raise BadRequest(
                    f"step would reach {msg.position + num_new} tokens, above the session's max_length "
                    f"{cache.max_length}"
                )
            hypo_ids = None
            if msg.hypo_ids is not None:
                if len(msg.hypo_ids) != opened.batch_size or not all(
                    0 <= i < opened.batch_size for i in msg.hypo_ids
                ):
                    raise BadRequest(
                        f"hypo_ids must be {opened.batch_size} row indices in 0..{opened.batch_size - 1}"
                    )
                hypo_ids = torch.tensor(msg.hypo_ids, dtype=torch.long)
            if msg.pads is not None and (
                len(msg.pads) != opened.batch_size or not all(0 <= p <= cache.max_length for p in msg.pads)
            ):
                raise BadRequest(f"pads must be {opened.batch_size} integers in 0..{cache.max_length}")
            del cache  # the session owns it: a move may drop it while this step waits
            session.leads_chain = msg.chain_start
            try:
                out = await self.s.scheduler.step(session, hidden, msg.position, hypo_ids, msg.pads)
            except SessionClosedError as e:
                raise BadRequest(str(e), e.code, retryable=True) from None
            session.steps += 1
            length = session.length
        metrics.count_step(hidden.shape[0], num_new)
        push_error = None
        if msg.push:  # the next server first (the critical path), then the client's copy
            push_error = "push is off on this server"
            if self.s.push is not None:
                push_error = await self.s.push.push(entry, msg, out)
        async with entry.write_lock:
            await _send(
                entry.client_writer,
                InferenceStepResult(
                    step_id=msg.step_id,
                    position=length,
                    server_ms=(time.perf_counter() - received) * 1000,
                    push_error=push_error,
                ),
                [out],
                opened.output_compression,
            )

    # --- push (server/push.py) ------------------------------------------------------------------------

    async def push(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Steps pushed by the previous server of a chain (``PROTOCOL_PUSH``)."""
        if self.s.push is None:
            return
        hub = self.s.push
        await _guarded(writer, peer, "push", lambda: hub.handle(peer, reader, writer, self._pushed_step))

    async def _pushed_step(self, entry: SessionPush, msg: InferenceStep, hidden: torch.Tensor) -> None:
        """A pushed step: its failures go to the session's client (on its stream), who fails over as usual."""
        try:
            await self._step(entry, msg, hidden)
        except BadRequest as e:
            logger.info("pushed step of session %s refused: %s", entry.session.id[:8], e)
            async with entry.write_lock:
                await _reply_error(entry.client_writer, e.code, str(e), e.retryable)
        except CacheFullError as e:
            async with entry.write_lock:
                await _reply_error(entry.client_writer, "cache_full", str(e), True)

    # --- forward / backward ------------------------------------------------------------------------------

    async def forward(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _guarded(writer, peer, "forward", lambda: self._forward(reader, writer))

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        msg, tensors = await read_message(reader, self.s.limits, timeout=self.s.config.request_timeout)
        if not isinstance(msg, ForwardRequest):
            raise BadRequest(f"expected forward_request, got {_kind(msg)}")
        span = self.s.check_span(msg.model, msg.start, msg.end)
        if not tensors:
            raise BadRequest("forward_request carries no hidden states")
        hidden = tensors[0]
        self.s.check_hidden(hidden, "hidden states")
        tuning = self._tuning(span, msg.tuning, tensors[1:], batch=hidden.shape[0], tokens=hidden.shape[1])

        # in pieces, so other clients' inference steps run between them (server/forward_chunks.py)
        out, activation_id = await self.s.chunked.forward(
            PRIORITY_FORWARD, span, hidden, tuning, keep=msg.keep_activations
        )
        metrics.count_request("forward", hidden.shape[0] * hidden.shape[1])
        await _send(writer, ForwardResult(activation_id=activation_id), [out], msg.output_compression)

    async def backward(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _guarded(writer, peer, "backward", lambda: self._backward(reader, writer))

    async def _backward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        msg, tensors = await read_message(reader, self.s.limits, timeout=self.s.config.request_timeout)
        if not isinstance(msg, BackwardRequest):
            raise BadRequest(f"expected backward_request, got {_kind(msg)}")
        span = self.s.check_span(msg.model, msg.start, msg.end)
        if len(tensors) < 2:
            raise BadRequest("backward_request carries hidden states and output gradients")
        hidden, grad_out = tensors[0], tensors[1]
        self.s.check_hidden(hidden, "hidden states")
        if grad_out.shape != hidden.shape or not grad_out.is_floating_point():
            raise BadRequest(f"grad_out {list(grad_out.shape)} must match hidden states {list(hidden.shape)}")
        tuning = self._tuning(span, msg.tuning, tensors[2:], batch=hidden.shape[0], tokens=hidden.shape[1])

        # from the kept graphs, or recomputed when none match; in pieces like the forward
        grads = await self.s.chunked.backward(
            PRIORITY_BACKWARD, span, hidden, grad_out, tuning, msg.activation_id
        )
        metrics.count_request("backward", hidden.shape[0] * hidden.shape[1])
        await _send(writer, BackwardResult(), grads, msg.output_compression)

    def _tuning(
        self, span: BlockSpan, tuning: Tuning, tensors: list[torch.Tensor], *, batch: int, tokens: int
    ) -> TuningInputs:
        try:
            inputs = unpack_tuning(
                span,
                tuning,
                tensors,
                batch=batch,
                adapters=self.s.adapters,
                dtype=self.s.dtype,
                device=self.s.device,
            )
        except TuningError as e:
            raise BadRequest(str(e), e.code) from None
        if inputs.prompts is not None and inputs.prompts.shape[2] > tokens:
            raise BadRequest(f"{inputs.prompts.shape[2]} prompt positions but at most {tokens} tokens")
        return inputs


def _kind(msg: Message) -> str:
    return str(getattr(msg, "kind", type(msg).__name__))
