"""Client-owned LoRA adapters for the frozen blocks, applied inside potluck's own block code; PEFT file format.

A target projection ``y = linear(x)`` of a block becomes ``y + (x @ A.T) @ B.T * scaling`` (PEFT semantics,
``scaling = alpha / rank``, no dropout). The adapters of a span of blocks live in a :class:`LoraWeights`: per target
one stacked ``A [n_blocks, rank, in]`` and one ``B [n_blocks, out, rank]``, so a span slices them with plain views
and autograd reaches the client's tensors through every slice.

Blocks receive a per-block :class:`BlockLora` (``target -> (A_i, B_i)`` plus the scaling) and route their target
projections through :func:`lora_linear`. This module must not import the family modules (they import it); the
PEFT functions look the family up lazily.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from potluck.models.spec import ModelSpec

if TYPE_CHECKING:
    from potluck.models.family import ModelFamily

__all__ = [
    "BlockLora",
    "LoraConfig",
    "LoraWeights",
    "lora_linear",
    "target_features",
]

# ---------------------------------------------------------------------------------------------------------------
# config


def _valid_targets(family_name: str) -> tuple[str, ...]:
    """LoRA targets of the family called ``family_name`` (ValueError for an unknown family)."""
    return tuple(_family(family_name).lora_targets)


def _family(family_name: str) -> ModelFamily:
    from potluck.models.registry import (
        family_by_name,  # lazy: the registry imports the families, which import us
    )

    try:
        return family_by_name(family_name)
    except ValueError as e:
        raise ValueError(f"LoRA is not supported for {e}") from None


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha and target projections of a LoRA adapter (the same for every block)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not math.isfinite(self.alpha)
        ):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(
                f"LoRA targets must be a non-empty sequence of module names, got {self.targets!r}"
            )
        if len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets contain duplicates: {targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, family_name: str) -> None:
        """Raise ValueError if a target is not a projection of ``family_name`` (``spec.family``)."""
        valid = _valid_targets(family_name)
        unknown = [t for t in self.targets if t not in valid]
        if unknown:
            raise ValueError(
                f"unknown LoRA target(s) {', '.join(map(repr, unknown))} for model family {family_name!r}; "
                f"valid targets: {', '.join(valid)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        unknown = set(data) - {"rank", "alpha", "targets"}
        if unknown:
            raise ValueError(f"unknown LoraConfig field(s): {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = dict(data)
        if "targets" in kwargs:
            targets = kwargs["targets"]
            kwargs["targets"] = (targets,) if isinstance(targets, str) else tuple(targets)
        return cls(**kwargs)


def target_features(spec: ModelSpec, target: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of projection ``target`` in a block of ``spec``."""
    return _family(spec.family).lora_target(target).features(spec)


def target_experts(spec: ModelSpec, target: str) -> int:
    """Number of stacked experts ``target`` adapts (one adapter each), 0 for a plain projection."""
    experts = _family(spec.family).lora_target(target).experts
    return 0 if experts is None else experts(spec)


# ---------------------------------------------------------------------------------------------------------------
# application inside blocks


@dataclass(frozen=True)
class BlockLora:
    """The adapters of one block: ``target -> (A [rank, in], B [out, rank])`` and the common scaling.

    Targets on stacked experts have one adapter per expert: ``A [E, rank, in]``, ``B [E, out, rank]``.
    """

    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


def lora_linear(linear: nn.Linear, x: torch.Tensor, lora: BlockLora | None, target: str) -> torch.Tensor:
    """``linear(x)`` plus the LoRA update of ``target`` if ``lora`` adapts it: ``x [..., in]`` -> ``[..., out]``.

    Like PEFT, the low-rank path runs in the adapter's dtype and is cast back to the projection's output dtype.
    """
    out = linear(x)  # [..., out]
    if lora is None:
        return out
    pair = lora.adapters.get(target)
    if pair is None:
        return out
    a, b = pair  # [r, in], [out, r]
    delta = F.linear(F.linear(x.to(a.dtype), a), b)  # [..., r] -> [..., out]
    return out + (delta * lora.scaling).to(out.dtype)  # [..., out]


# ---------------------------------------------------------------------------------------------------------------
# weights


Shape = tuple[int, ...]  # [n, rank, in] / [n, out, rank], or [n, E, rank, in] / [n, E, out, rank] for experts


class LoraWeights:
    """LoRA adapters of blocks ``start..end-1`` (absolute indices).

    ``a[target]`` is ``[n_blocks, rank, in_features]``, ``b[target]`` is ``[n_blocks, out_features, rank]``;
    row ``i`` belongs to block ``start + i``. Tensors are used as given (no copies), so gradients of a forward
    through a span reach them (and the tensors they are views of).
    """

    def __init__(
        self,
        config: LoraConfig,
        start: int,
        end: int,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
    ) -> None:
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end:
            raise ValueError(f"invalid LoRA block range [{start}, {end}): need 0 <= start < end")
        targets = set(config.targets)
        if set(a) != targets or set(b) != targets:
            raise ValueError(
                f"LoRA A/B tensors must be given for exactly the targets {list(config.targets)}, "
                f"got A for {sorted(a)} and B for {sorted(b)}"
            )
        n = end - start
        for target in config.targets:
            a_t, b_t = a[target], b[target]
            # 4-d tensors hold one adapter per stacked expert: [n, E, rank, in] / [n, E, out, rank]
            if a_t.dim() not in (3, 4) or a_t.shape[0] != n or a_t.shape[-2] != config.rank:
                raise ValueError(
                    f"LoRA A of {target!r} must be [{n}, {config.rank}, in_features], got {tuple(a_t.shape)}"
                )
            if b_t.dim() != a_t.dim() or b_t.shape[0] != n or b_t.shape[-1] != config.rank:
                raise ValueError(
                    f"LoRA B of {target!r} must be [{n}, out_features, {config.rank}], got {tuple(b_t.shape)}"
                )
        self.config = config
        self.start = start
        self.end = end
        self.a: dict[str, torch.Tensor] = {t: a[t] for t in config.targets}
        self.b: dict[str, torch.Tensor] = {t: b[t] for t in config.targets}

    # --- shape helpers -----------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return self.a[self.config.targets[0]].dtype

    @property
    def device(self) -> torch.device:
        return self.a[self.config.targets[0]].device

    @staticmethod
    def shapes(spec: ModelSpec, config: LoraConfig, n_blocks: int) -> dict[str, tuple[Shape, Shape]]:
        """``target -> (A shape [n, (E,) r, in], B shape [n, (E,) out, r])`` for ``n_blocks`` blocks of ``spec``."""
        config.validate(spec.family)
        shapes: dict[str, tuple[Shape, Shape]] = {}
        for target in config.targets:
            in_features, out_features = target_features(spec, target)
            experts = target_experts(spec, target)
            lead: Shape = (n_blocks, experts) if experts else (n_blocks,)
            shapes[target] = ((*lead, config.rank, in_features), (*lead, out_features, config.rank))
        return shapes

    def check_spec(self, spec: ModelSpec) -> None:
        """Raise ValueError unless targets and feature sizes fit ``spec`` and the blocks exist in it."""
        if self.end > spec.num_blocks:
            raise ValueError(
                f"LoRA covers blocks [{self.start}, {self.end}) but the model has {spec.num_blocks} blocks"
            )
        for target, (a_shape, b_shape) in self.shapes(spec, self.config, self.num_blocks).items():
            got_a, got_b = tuple(self.a[target].shape), tuple(self.b[target].shape)
            if got_a != a_shape or got_b != b_shape:
                raise ValueError(
                    f"LoRA {target!r} shapes do not fit model {spec.model_type!r}: expected A {a_shape} and "
                    f"B {b_shape}, got A {got_a} and B {got_b}"
                )

    # --- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        config: LoraConfig,
        start: int,
        end: int,
        tensors: Sequence[torch.Tensor],
        spec: ModelSpec | None = None,
    ) -> LoraWeights:
        """Inverse of :meth:`tensors`: ``[A_t0, B_t0, A_t1, B_t1, ...]`` in ``config.targets`` order.

        With ``spec`` the targets and in/out features are checked against the model too.
        """
        expected = 2 * len(config.targets)
        if len(tensors) != expected:
            raise ValueError(
                f"expected {expected} LoRA tensors (A and B for each of {list(config.targets)}), got {len(tensors)}"
            )
        if spec is not None:
            config.validate(spec.family)
        a = {t: tensors[2 * k] for k, t in enumerate(config.targets)}
        b = {t: tensors[2 * k + 1] for k, t in enumerate(config.targets)}
        weights = cls(config, start, end, a, b)
        if spec is not None:
            weights.check_spec(spec)
        return weights

    @classmethod
    def zeros_like_spec(
        cls,
        spec: ModelSpec,
        config: LoraConfig,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> LoraWeights:
        """All-zero A and B of the right shapes (e.g. gradient buffers); ``generator`` is ignored."""
        del generator
        _check_range(spec, start, end)
        a, b = {}, {}
        for target, (a_shape, b_shape) in cls.shapes(spec, config, end - start).items():
            a[target] = torch.zeros(a_shape, dtype=dtype, device=device)
            b[target] = torch.zeros(b_shape, dtype=dtype, device=device)
        return cls(config, start, end, a, b)

    @classmethod
    def init(
        cls,
        spec: ModelSpec,
        config: LoraConfig,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> LoraWeights:
        """PEFT's default init: A like ``nn.Linear`` (kaiming-uniform, a=sqrt(5)), B zeros (a no-op adapter)."""
        weights = cls.zeros_like_spec(spec, config, start, end, dtype=dtype, device=device)
        for target in config.targets:
            weights.a[target] = _linear_uniform(weights.a[target], generator)
        return weights

    @classmethod
    def init_random(
        cls,
        spec: ModelSpec,
        config: LoraConfig,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> LoraWeights:
        """A and B both ``nn.Linear``-style random (PEFT's ``init_lora_weights=False``), so the adapter is active."""
        weights = cls.init(spec, config, start, end, dtype=dtype, device=device, generator=generator)
        for target in config.targets:
            weights.b[target] = _linear_uniform(weights.b[target], generator)
        return weights

    # --- views and conversions -------------------------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        """``[A_t0, B_t0, A_t1, B_t1, ...]`` in ``config.targets`` order (the order :meth:`from_tensors` takes)."""
        out: list[torch.Tensor] = []
        for target in self.config.targets:
            out += [self.a[target], self.b[target]]
        return out

    def slice(self, start: int, end: int) -> LoraWeights:
        """Adapters of blocks ``start..end-1`` (absolute indices) as views; autograd flows to the originals."""
        if not self.start <= start < end <= self.end:
            raise ValueError(
                f"LoRA slice [{start}, {end}) is not a non-empty sub-range of [{self.start}, {self.end})"
            )
        if (start, end) == (self.start, self.end):
            return self
        lo, hi = start - self.start, end - self.start
        a = {t: x[lo:hi] for t, x in self.a.items()}
        b = {t: x[lo:hi] for t, x in self.b.items()}
        return LoraWeights(self.config, start, end, a, b)

    def block(self, index: int) -> BlockLora:
        """Adapters of local block ``index`` (``0 <= index < num_blocks``)."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"local block index {index} out of range for {self.num_blocks} blocks")
        adapters = {t: (self.a[t][index], self.b[t][index]) for t in self.config.targets}  # [r, in], [out, r]
        return BlockLora(adapters, self.config.scaling)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraWeights:
        """Copy with tensors moved/cast (differentiable, like ``Tensor.to``); returns ``self`` if nothing changes."""
        a = {t: x.to(dtype=dtype, device=device) for t, x in self.a.items()}
        b = {t: x.to(dtype=dtype, device=device) for t, x in self.b.items()}
        if all(a[t] is self.a[t] and b[t] is self.b[t] for t in self.config.targets):
            return self
        return LoraWeights(self.config, self.start, self.end, a, b)

    def detach(self) -> LoraWeights:
        a = {t: x.detach() for t, x in self.a.items()}
        b = {t: x.detach() for t, x in self.b.items()}
        return LoraWeights(self.config, self.start, self.end, a, b)

    def requires_grad_(self, requires_grad: bool = True) -> LoraWeights:
        """Set ``requires_grad`` on every tensor in place (they must be leaves); returns ``self``."""
        for tensor in self.tensors():
            tensor.requires_grad_(requires_grad)
        return self

    def __repr__(self) -> str:
        return (
            f"LoraWeights(start={self.start}, end={self.end}, rank={self.config.rank}, alpha={self.config.alpha}, "
            f"targets={list(self.config.targets)}, dtype={self.dtype}, device={self.device})"
        )


def _check_range(spec: ModelSpec, start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= spec.num_blocks:
        raise ValueError(
            f"invalid block range [{start}, {end}): need 0 <= start < end <= num_blocks ({spec.num_blocks})"
        )


def _linear_uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``nn.Linear``'s weight init (kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) per block.

    ``like`` is ``[n, out, in]``; sampled in fp32 on the generator's device, then moved to ``like``'s.
    """
    bound = 1.0 / math.sqrt(like.shape[-1])
    sample_device = generator.device if generator is not None else like.device
    x = torch.empty(like.shape, dtype=torch.float32, device=sample_device)
    x.uniform_(-bound, bound, generator=generator)
    return x.to(dtype=like.dtype, device=like.device)
