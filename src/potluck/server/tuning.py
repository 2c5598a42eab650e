"""What a request carries for fine-tuned models: deep prompts and LoRA adapters (sent, or preloaded by name).

Tensors come after the hidden states (and grad_out) in the order ``Tuning`` documents: [prompts], then for each
LoRA target A ``[n_blocks, rank, in]`` and B ``[n_blocks, out, rank]``. Everything is validated against the span
before it reaches the model; a mismatch is the client's error, reported to that client only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from potluck.models import BlockSpan, LoraConfig, LoraWeights, load_peft_adapter
from potluck.models.spec import ModelSpec
from potluck.wire import Tuning


class TuningError(ValueError):
    """The request's prompts or adapters do not fit the span; ``code`` is the ErrorReply code to answer with."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass
class TuningInputs:
    prompts: torch.Tensor | None = None  # [n_blocks, B|1, P, H] on the server's device and dtype
    lora: LoraWeights | None = None  # adapters for exactly the span's blocks
    sent_lora: bool = False  # the client sent the adapters (so it wants their gradients back)

    def leaves(self) -> list[torch.Tensor]:
        """Tensors the client sent that may want gradients, in wire order."""
        out = [] if self.prompts is None else [self.prompts]
        if self.lora is not None and self.sent_lora:
            out.extend(self.lora.tensors())
        return out

    def requires_grad_(self) -> TuningInputs:
        prompts = None if self.prompts is None else self.prompts.detach().requires_grad_(True)
        lora = self.lora
        if lora is not None and self.sent_lora:
            lora = LoraWeights.from_tensors(
                lora.config, lora.start, lora.end, [t.detach().requires_grad_(True) for t in lora.tensors()]
            )
        return TuningInputs(prompts=prompts, lora=lora, sent_lora=self.sent_lora)


def num_tuning_tensors(tuning: Tuning) -> int:
    return int(tuning.has_prompts) + (2 * len(tuning.lora.targets) if tuning.lora is not None else 0)


def unpack_tuning(
    span: BlockSpan,
    tuning: Tuning,
    tensors: list[torch.Tensor],
    *,
    batch: int,
    adapters: dict[str, LoraWeights],
    dtype: torch.dtype,
    device: torch.device,
) -> TuningInputs:
    """Validate and convert the tuning tensors of a request (``tensors`` holds only those)."""
    if len(tensors) != num_tuning_tensors(tuning):
        raise TuningError(f"expected {num_tuning_tensors(tuning)} prompt/adapter tensors, got {len(tensors)}")
    n = span.end - span.start
    hidden = int(span.spec.hidden_size)
    prompts = None
    rest = list(tensors)
    if tuning.has_prompts:
        prompts = rest.pop(0)
        if (
            prompts.ndim != 4
            or prompts.shape[0] != n
            or prompts.shape[1] not in (1, batch)
            or prompts.shape[3] != hidden
            or not prompts.is_floating_point()
        ):
            raise TuningError(
                f"prompts must be [{n}, {batch} or 1, prefix, {hidden}], got {list(prompts.shape)}"
            )
        prompts = prompts.to(device=device, dtype=dtype)
    lora = None
    if tuning.lora is not None and tuning.active_adapter is not None:
        raise TuningError("send adapters or name a preloaded one (active_adapter), not both")
    if tuning.lora is not None:
        config = LoraConfig(
            rank=tuning.lora.rank, alpha=tuning.lora.alpha, targets=tuple(tuning.lora.targets)
        )
        try:
            config.validate(span.family.name)
            lora = LoraWeights.from_tensors(config, span.start, span.end, rest, spec=span.spec)
        except ValueError as e:
            raise TuningError(str(e)) from None
        if not all(t.is_floating_point() for t in rest):
            raise TuningError("LoRA tensors must be floating point")
        lora = lora.to(dtype=dtype, device=device)
    elif tuning.active_adapter is not None:
        full = adapters.get(tuning.active_adapter)
        if full is None:
            names = ", ".join(sorted(adapters)) or "none"
            raise TuningError(
                f"adapter {tuning.active_adapter!r} is not loaded here (loaded: {names})", "unknown_adapter"
            )
        lora = full.slice(span.start, span.end)
    return TuningInputs(prompts=prompts, lora=lora, sent_lora=tuning.lora is not None)


def load_adapters(
    paths: tuple[str, ...], spec: ModelSpec, start: int, end: int, *, dtype: torch.dtype, device: str
) -> dict[str, LoraWeights]:
    """Preload PEFT adapters (``--adapters``), each named after its directory, sliced to this server's span."""
    out: dict[str, LoraWeights] = {}
    for path in paths:
        name = Path(path).name
        full = load_peft_adapter(path, spec, dtype=dtype, device=torch.device(device))
        out[name] = full.slice(start, end)
    return out
