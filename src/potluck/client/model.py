"""The HF-style client: a causal LM whose transformer blocks live in the swarm.

    from potluck import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained("org/model", initial_peers=[...])
    out = model.generate(input_ids, max_new_tokens=32)

The client loads only the embeddings, final norm and LM head; every forward, generation step and backward
goes through servers found in the DHT.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from potluck.client.config import ClientConfig
from potluck.client.generation import GenerationParams, generate_tokens, left_padding
from potluck.client.inference import RemoteInferenceSession
from potluck.client.loop import LoopThread, shared_loop
from potluck.client.remote_blocks import LOOP_GRACE, RemoteBlocks, remote_blocks
from potluck.client.speculative import Speculation, SpeculationStats, load_draft
from potluck.client.swarm_view import SwarmView
from potluck.client.tuning import TUNING_MODES, PromptTuning, RemoteLora, TuningPayload, default_lora_targets
from potluck.client.verification import VerificationRollback
from potluck.models import ClientParts, LoraConfig, load_client_parts, load_config
from potluck.models.fingerprint import checkpoint_fingerprint
from potluck.swarm.records import model_prefix_for

logger = logging.getLogger(__name__)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None


class InferenceSession:
    """A sync handle over ``RemoteInferenceSession`` that also remembers the token ids it has processed."""

    def __init__(
        self, model: DistributedModelForCausalLM, remote: RemoteInferenceSession, prefix_length: int = 0
    ):
        self.model = model
        self.remote = remote
        self.prefix_length = prefix_length  # soft-prompt positions fed before the first token
        self.token_ids: torch.Tensor | None = (
            None  # [B, n] the token sequence so far (the last may not be fed)
        )

    @property
    def position(self) -> int:
        """Tokens (not counting soft-prompt positions) the servers' caches hold."""
        return max(0, self.remote.position - self.prefix_length)

    @property
    def max_length(self) -> int:
        return self.remote.max_length

    def step(
        self, hidden: torch.Tensor, position: int | None = None, hypo_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states [B, T, H] through all remote blocks, using and extending the servers' caches.

        ``hypo_ids [B]`` (beam search) first replaces each cache row b by former row ``hypo_ids[b]``.
        """
        # The step's one deadline (request_timeout) is inside the call; the loop wait only guards a stuck loop.
        timeout = self.model.client_config.request_timeout + LOOP_GRACE
        hypo = None if hypo_ids is None else [int(i) for i in hypo_ids]
        return self.model.loop.run(
            self.remote.step(hidden, position=position, hypo_ids=hypo), timeout=timeout
        )

    def rollback(self, position: int) -> None:
        """Forget tokens at positions >= ``position`` (speculative decoding drops rejected draft tokens)."""
        self.remote.rollback(position + self.prefix_length)

    def close(self) -> None:
        self.model.loop.run(self.remote.close(), timeout=10)


_active_session: contextvars.ContextVar[InferenceSession | None] = contextvars.ContextVar(
    "potluck_active_session", default=None
)


class DistributedModelForCausalLM(nn.Module):
    """Client parts (embeddings, final norm, LM head) + the swarm's blocks."""

    def __init__(
        self,
        name_or_path: str,
        hf_config: Any,
        client_parts: ClientParts,
        view: SwarmView,
        client_config: ClientConfig,
        loop: LoopThread,
        tokenizer: Any = None,
        fingerprint: str | None = None,
    ):
        super().__init__()
        self.name_or_path = name_or_path
        self.config = hf_config
        self.client = client_parts
        self.view = view
        self.client_config = client_config
        self.loop = loop
        self.tokenizer = tokenizer
        # of our checkpoint (models/fingerprint.py): servers announcing another one are refused
        self.fingerprint = fingerprint
        self.blocks = RemoteBlocks(view, fingerprint)
        self._closed = False
        spec, family = client_parts.spec, client_parts.family.name
        dtype = next(client_parts.parameters()).dtype
        mode = client_config.tuning_mode
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        # Trainable, client-owned parameters (the only ones with requires_grad in this module).
        self.prompts = (
            PromptTuning(spec, client_config.pre_seq_len, deep=mode == "deep_ptune", dtype=dtype)
            if mode is not None
            else None
        )
        self.lora = None
        if client_config.lora_rank > 0:
            targets = client_config.lora_targets or default_lora_targets(family)
            lora_config = LoraConfig(
                rank=client_config.lora_rank, alpha=client_config.lora_alpha, targets=targets
            )
            self.lora = RemoteLora(spec, lora_config, family, dtype=dtype)
            if client_config.active_adapter:
                raise ValueError(
                    "use client-owned LoRA (lora_rank) or a server adapter (active_adapter), not both"
                )

    # --- construction / teardown -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        torch_dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        revision: str | None = None,
        token: str | None = None,
        load_tokenizer: bool = True,
        **kwargs: Any,
    ) -> DistributedModelForCausalLM:
        client_config, rest = ClientConfig.split_kwargs(dict(kwargs))
        if rest:
            raise TypeError(f"unknown from_pretrained arguments: {sorted(rest)}")
        dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        hf_config = load_config(name_or_path, revision=revision, token=token)
        parts = load_client_parts(name_or_path, dtype=dtype, device=device, revision=revision, token=token)
        parts.requires_grad_(False)
        if client_config.prepack_head:
            parts.prepack_head()  # fp32 on CPU only (models/cpu_linear.py); a no-op elsewhere
        tokenizer = _load_tokenizer(name_or_path, revision, token) if load_tokenizer else None
        fingerprint = None
        if client_config.check_fingerprint:
            fingerprint = checkpoint_fingerprint(
                name_or_path, revision=revision, token=token, config=hf_config
            )
        prefix = client_config.model_prefix or model_prefix_for(name_or_path)
        loop = shared_loop()
        view = loop.run(
            SwarmView.create(client_config, prefix, int(hf_config.num_hidden_layers)),
            timeout=client_config.startup_timeout + 30,
        )
        return cls(name_or_path, hf_config, parts, view, client_config, loop, tokenizer, fingerprint)

    def shutdown(self) -> None:
        """Stop this client's p2pd and DHT node."""
        if not self._closed:
            self._closed = True
            self.loop.run(self.view.close(), timeout=15)

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- forward (no cache) ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the client's parts live (inputs and outputs of ``forward`` / ``generate``), as in transformers."""
        return next(self.client.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self.client.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_ignored: Any,
    ) -> CausalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.client.embed(input_ids)  # [B, T, H]
        prefix = 0
        if self.prompts is not None:  # soft prompt tokens go first; their outputs are dropped below
            prefix = self.prompts.pre_seq_len
            inputs_embeds = torch.cat([self.prompts.prefix(inputs_embeds.shape[0]), inputs_embeds], dim=1)
        hidden = self.client.pre_blocks(inputs_embeds)  # [B, P+T, H]
        hidden = remote_blocks(hidden, self.blocks, self.loop, self.tuning_payload())  # [B, P+T, H]
        logits = self.client.head(hidden[:, prefix:])  # [B, T, V]
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)  # [B*(T-1)]
            loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def tuning_payload(self) -> TuningPayload:
        """The trainable tensors (or adapter name) that requests carry to the servers."""
        return TuningPayload(
            prompts=self.prompts.deep_prompts() if self.prompts is not None else None,
            lora=self.lora.weights() if self.lora is not None else None,
            active_adapter=self.client_config.active_adapter,
        )

    # --- inference sessions ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Servers keep KV caches for up to ``max_length`` tokens; ``generate`` calls inside continue it."""
        prefix = self.prompts.pre_seq_len if self.prompts is not None else 0
        remote = RemoteInferenceSession(
            self.view,
            max_length=max_length + prefix,
            batch_size=batch_size,
            tuning=self.tuning_payload(),
            fingerprint=self.fingerprint,
        )
        self.loop.run(remote.open(), timeout=self.client_config.request_timeout + LOOP_GRACE)
        session = InferenceSession(self, remote, prefix_length=prefix)
        reset = _active_session.set(session)
        try:
            yield session
        finally:
            _active_session.reset(reset)
            session.close()

    @property
    def active_session(self) -> InferenceSession | None:
        return _active_session.get()

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        streamer: Any = None,
        session: InferenceSession | None = None,
        tokenizer: Any = None,
        assistant_model: Any = None,
        num_assistant_tokens: int = 4,
        num_assistant_tokens_schedule: str = "heuristic",
        speculation_stats: SpeculationStats | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """HF-compatible generation (greedy, sampling, repetition penalty, eos/stop, streamers).

        ``stop_strings`` need a tokenizer: ``tokenizer=`` as in transformers, else the one loaded with the model.

        Inside ``inference_session``, ``input_ids`` may either repeat the tokens already processed (they are
        skipped) or hold only new tokens, which continue the conversation; the result is the session's whole
        token sequence.

        ``assistant_model`` (a draft: checkpoint path, ``LocalCausalLM``, transformers model or
        :func:`~potluck.client.speculative.load_draft` result) turns on speculative decoding: the draft proposes
        ``num_assistant_tokens`` tokens (adapted to its acceptance rate unless the schedule is ``"constant"``)
        that the swarm checks in one step; greedy output is unchanged, sampled output keeps its distribution.
        ``speculation_stats`` (a ``SpeculationStats``) is filled in with rounds and acceptance.
        """
        session = session or self.active_session
        pads = left_padding(kwargs.pop("attention_mask", None))  # prompts of different lengths, left-padded
        if pads is not None and self.prompts is not None:
            raise ValueError("left-padded batches are not supported together with soft prompts (ptune)")
        if input_ids is None:
            if session is None or session.token_ids is None:
                raise ValueError("input_ids is required outside a session that already holds tokens")
            input_ids = session.token_ids  # continue the session's sequence
        input_ids = input_ids.to(torch.long)
        prior = session.token_ids if session is not None and session.token_ids is not None else None
        if prior is not None and not _starts_with(input_ids, prior):
            input_ids = torch.cat([prior, input_ids.to(prior.device)], dim=1)
        already = session.position if session is not None else 0  # tokens the servers' caches hold
        if max_new_tokens is None:
            max_new_tokens = (max_length - input_ids.shape[1]) if max_length is not None else 20
        if (
            "eos_token_id" not in kwargs
        ):  # HF default: stop at the checkpoint's eos; an explicit None never stops
            kwargs["eos_token_id"] = getattr(self.config, "eos_token_id", None)
        params = GenerationParams.from_kwargs(None, max_new_tokens=max_new_tokens, **kwargs)
        speculation = None
        if assistant_model is not None:
            speculation = Speculation(
                load_draft(assistant_model), num_assistant_tokens, num_assistant_tokens_schedule,
                speculation_stats if speculation_stats is not None else SpeculationStats(),
            )  # fmt: skip
        beams = params.num_beams  # beam search keeps num_beams rows per prompt
        if pads is not None and beams > 1:
            pads = [p for p in pads for _ in range(beams)]
        if session is None:
            with self.inference_session(
                input_ids.shape[1] + max_new_tokens, batch_size=input_ids.shape[0] * beams
            ) as s:
                s.remote.pads = pads
                return self._generate_in(s, input_ids, 0, params, streamer, tokenizer, speculation)
        if input_ids.shape[1] < already:
            raise RuntimeError(f"the session holds {already} tokens but only {input_ids.shape[1]} were given")
        if pads is not None or already == 0:
            session.remote.pads = pads  # a continued session keeps the padding of its first prompt
        return self._generate_in(session, input_ids, already, params, streamer, tokenizer, speculation)

    def _generate_in(
        self,
        session: InferenceSession,
        input_ids: torch.Tensor,
        already: int,
        params: GenerationParams,
        streamer: Any,
        tokenizer: Any = None,
        speculation: Speculation | None = None,
    ) -> torch.Tensor:
        if speculation is not None:
            out = speculation.generate(
                self, session, input_ids, params, streamer, tokenizer or self.tokenizer
            )
            session.token_ids = out
            return out
        first = True
        seen = input_ids  # [B, n] every token given to the loop so far (to resume after a rollback)

        def step(new_ids: torch.Tensor, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
            nonlocal first, seen
            if first:  # the whole known sequence (beam search: already expanded to one row per beam)
                seen = new_ids
            else:
                seen = torch.cat([seen if hypo_ids is None else seen[hypo_ids], new_ids], dim=1)
            position = None
            ids = new_ids[:, already:] if first else new_ids  # the first call repeats the known prefix
            if (
                ids.shape[1] == 0
            ):  # nothing new: recompute the last known token (rolls the caches back by one)
                ids, position = new_ids[:, -1:], session.position - 1
            first = False
            embeds = self.client.embed(ids)  # [B, t, H]
            if position is not None:
                position += session.prefix_length
            if session.remote.position == 0 and self.prompts is not None:  # the soft prompt opens the session
                embeds = torch.cat([self.prompts.prefix(embeds.shape[0]).to(embeds.dtype), embeds], dim=1)
            hidden = session.step(self.client.pre_blocks(embeds), position=position, hypo_ids=hypo_ids)
            return self.client.head(hidden[:, -1:])[:, -1]  # [B, V]

        prompt_length = input_ids.shape[1]
        total = prompt_length + params.num_new_tokens(prompt_length)
        while True:
            try:
                out = generate_tokens(
                    step, input_ids, params, streamer=streamer, tokenizer=tokenizer or self.tokenizer
                )
                break
            except VerificationRollback as rollback:
                if params.num_beams > 1:  # beams cannot resume mid-search: the caller sees the error
                    raise
                # [trust] a liar was caught: regenerate the tokens after the last verified position
                already = max(0, rollback.position - session.prefix_length)
                input_ids = seen[:, : max(already + 1, prompt_length)]
                if params.max_new_tokens is not None:
                    params = dataclasses.replace(params, max_new_tokens=max(0, total - input_ids.shape[1]))
                first, seen = True, input_ids
                streamer = _Resumed(streamer) if streamer is not None else None
                logger.warning("%s; regenerating from token %d", rollback, input_ids.shape[1])
        session.token_ids = out
        return out


class _Resumed:
    """A streamer after a rollback: the tokens it already got are not sent again; the regenerated ones are."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped:  # generate_tokens first puts the prompt, which the streamer has seen
            self.skipped = True
            return
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def _starts_with(ids: torch.Tensor, prefix: torch.Tensor) -> bool:
    return ids.shape[1] >= prefix.shape[1] and bool(
        (ids[:, : prefix.shape[1]] == prefix.to(ids.device)).all()
    )


def _load_tokenizer(name_or_path: str, revision: str | None, token: str | None) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, token=token)
    except Exception as e:  # many test checkpoints have no tokenizer: generation still works on ids
        logger.debug("no tokenizer for %s: %s", name_or_path, e)
        return None


class AutoDistributedModelForCausalLM:
    """Entry point mirroring transformers' Auto classes."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs: Any) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(name_or_path, **kwargs)
