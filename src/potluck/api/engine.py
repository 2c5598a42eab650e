"""The engine behind the HTTP API: one inference session per request, run on a worker thread.

The client library is synchronous (each swarm step blocks on the client's network loop), so every request gets
a thread from a bounded pool and its own ``torch.Generator``; tokens travel back to the ASGI loop through an
``asyncio.Queue``. A request whose consumer goes away (client hung up) sets its cancel flag: the worker stops
before its next step and leaving ``inference_session`` closes the session on every server, freeing their caches.

With a draft (``potluck api --draft``) every request decodes speculatively: greedy requests give exactly the
plain output, sampled ones keep the model's distribution (``client/speculative.py``); each request gets its own
draft cache, the draft's weights are shared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from potluck.client.generation import GenerationParams, generate_tokens
from potluck.client.model import DistributedModelForCausalLM
from potluck.client.speculative import Speculation

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # context limit when the checkpoint's config names none


class ContextLengthError(ValueError):
    """Prompt plus requested tokens exceed the model's context (an HTTP 400)."""


class Cancelled(Exception):
    """The request's consumer went away; the worker unwinds and its session closes."""


class _StopSequence(Exception):
    """A stop sequence appeared in the text: generation ends here (finish_reason "stop")."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int | None  # None: up to the context limit
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and k alternatives


@dataclass(frozen=True)
class TokenOut:
    token_id: int
    text: str  # new text this token releases (may be empty: held back for a stop sequence or a partial char)
    token: str  # the token decoded alone
    logprob: float | None = None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (eos or a stop sequence) | "length"
    prompt_tokens: int
    completion_tokens: int
    failovers: int = 0


class TextTracker:
    """Turns generated ids into text deltas, holding back what could still become a stop sequence."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released

    def _decode(self) -> str:
        return str(
            self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text released by this token, whether a stop sequence ended the text)."""
        self.ids.append(token_id)
        text = self._decode()
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = max(min(hits), self.emitted)
            delta, self.emitted = text[self.emitted : end], end
            return delta, True
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)  # an incomplete UTF-8 sequence
        for stop in self.stops:  # the text's end may be the start of a stop sequence: wait for more
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        safe = max(safe, self.emitted)
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, False

    def flush(self) -> str:
        """Everything not yet released (generation ended without a stop sequence)."""
        text = self._decode()
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


@dataclass
class _Run:
    """One request's worker-side state."""

    request: GenerationRequest
    emit: Callable[[object], None]
    cancel: threading.Event
    last_logits: torch.Tensor | None = None  # [V] logits of the latest step
    completion_tokens: int = 0
    saw_eos: bool = False
    eos_ids: frozenset[int] = field(default_factory=frozenset)


class Engine:
    """Completions over a ``DistributedModelForCausalLM``; safe to call from many requests at once."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        *,
        max_concurrency: int = 16,
        chat_template: str | None = None,
        context_length: int | None = None,
        speculation: Speculation | None = None,
    ):
        if model.tokenizer is None:
            raise ValueError(
                f"{model.name_or_path} has no tokenizer: the API needs one to read and write text"
            )
        self.model = model
        self.speculation = speculation  # a draft proposes tokens the swarm checks in one step (None: plain)
        self.tokenizer = model.tokenizer
        self.chat_template = chat_template
        self.context_length = int(
            context_length or getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        )
        eos = getattr(model.config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_id: int | tuple[int, ...] | None = (
            eos if eos is None or isinstance(eos, int) else tuple(int(i) for i in eos)
        )
        self.max_concurrency = max_concurrency
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="potluck-api")
        self.active = 0  # requests running now
        self._active_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- prompts ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]]

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this model's tokenizer has no chat template; pass --chat-template FILE")
        return str(
            self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        )

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        # The template writes any BOS itself; adding special tokens again would double it.
        text = self.render_chat(messages)
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False))

    # --- generation -------------------------------------------------------------------------------------

    def budget(self, request: GenerationRequest) -> int:
        """New tokens this request may generate; raises ContextLengthError if the context cannot hold them."""
        prompt = len(request.prompt_ids)
        room = self.context_length - prompt
        if not request.prompt_ids:
            raise ContextLengthError("the prompt is empty")
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            raise ContextLengthError(
                f"this model's context is {self.context_length} tokens; the prompt has {prompt} and "
                f"max_tokens asks for {request.max_tokens if request.max_tokens is not None else 'more'}"
            )
        return request.max_tokens if request.max_tokens is not None else room

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenOut | Done]:
        """Tokens as they come, then ``Done``; errors (MissingBlocksError, ...) are raised here."""
        self.budget(request)  # refuse before taking a worker
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        run = _Run(request, emit, cancel)
        loop.run_in_executor(self._pool, self._work, run)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, (TokenOut, Done))
                yield item
                if isinstance(item, Done):
                    return
        finally:
            cancel.set()  # no-op after Done; after a hang-up, the worker stops before its next step

    def _work(self, run: _Run) -> None:
        with self._active_lock:
            self.active += 1
        try:
            run.emit(self._generate(run))
        except Cancelled:
            logger.info("request cancelled by its client; its session is closed")
        except BaseException as e:  # noqa: BLE001 - delivered to the request's handler
            run.emit(e)
        finally:
            with self._active_lock:
                self.active -= 1

    @torch.inference_mode()
    def _generate(self, run: _Run) -> Done:
        req, model = run.request, self.model
        if run.cancel.is_set():
            raise Cancelled
        budget = self.budget(req)
        eos = self.eos_token_id
        run.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
        params = GenerationParams(
            max_new_tokens=budget,
            do_sample=req.temperature > 0,
            temperature=req.temperature if req.temperature > 0 else 1.0,
            top_k=None,  # OpenAI has no top-k; transformers' default of 50 must not apply
            top_p=req.top_p,
            eos_token_id=eos,
        )
        generator = torch.Generator().manual_seed(req.seed if req.seed is not None else secrets.randbits(63))
        tracker = TextTracker(self.tokenizer, req.stop)
        input_ids = torch.tensor([req.prompt_ids], dtype=torch.long)  # [1, T]
        finish = "length"
        with model.inference_session(max_length=len(req.prompt_ids) + budget) as session:

            def step(new_ids: torch.Tensor) -> torch.Tensor:  # [1, t] -> [1, V]
                if run.cancel.is_set():
                    raise Cancelled
                hidden = session.step(model.client.pre_blocks(model.client.embed(new_ids)))  # [1, t, H]
                logits = model.client.head(hidden[:, -1:])[:, -1]  # [1, V]
                run.last_logits = logits[0]
                return logits

            streamer = _Streamer(self, run, tracker)
            try:
                if self.speculation is not None:
                    speculation = self.speculation
                    if params.do_sample and req.seed is not None:
                        # k adapts to measured timings, and each k consumes the generator differently: a
                        # fixed k keeps the promise that a seed repeats its text
                        speculation = dataclasses.replace(speculation, schedule="constant")
                    speculation.generate(
                        model, session, input_ids, params, streamer=streamer, tokenizer=self.tokenizer,
                        generator=generator, on_logits=lambda logits: setattr(run, "last_logits", logits),
                    )  # fmt: skip
                else:
                    generate_tokens(step, input_ids, params, streamer=streamer, generator=generator)
            except _StopSequence:
                finish = "stop"
            else:
                if run.saw_eos:
                    finish = "stop"
                rest = tracker.flush()
                if rest:
                    run.emit(TokenOut(token_id=-1, text=rest, token=""))
            failovers = int(getattr(session.remote, "failovers", 0))
        return Done(finish, len(req.prompt_ids), run.completion_tokens, failovers)


class _Streamer:
    """The ``streamer`` of ``generate_tokens``: turns each new token into a ``TokenOut`` for the request."""

    def __init__(self, engine: Engine, run: _Run, tracker: TextTracker):
        self.engine, self.run, self.tracker = engine, run, tracker
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate_tokens first puts the prompt
            self.prompt_seen = True
            return
        run = self.run
        token_id = int(value.reshape(-1)[0])
        run.completion_tokens += 1
        logprob: float | None = None
        top: tuple[tuple[str, float], ...] = ()
        k = run.request.top_logprobs
        if k is not None and run.last_logits is not None:
            logprobs = torch.log_softmax(run.last_logits.float(), dim=-1)  # [V]
            logprob = float(logprobs[token_id])
            if k > 0:
                values, ids = torch.topk(logprobs, k)
                top = tuple(
                    (self.engine.token_text(int(i)), float(v)) for v, i in zip(values, ids, strict=True)
                )
        if token_id in run.eos_ids:
            run.saw_eos = True
            text, stopped = "", False
        else:
            text, stopped = self.tracker.add(token_id)
        run.emit(TokenOut(token_id, text, self.engine.token_text(token_id), logprob, top))
        if stopped:
            raise _StopSequence
        if run.cancel.is_set():
            raise Cancelled

    def end(self) -> None:
        pass
