"""Preallocated key/value cache for a span of transformer blocks.

One pair of buffers per block, indexed by absolute token position (gpt-fast style): tokens ``0..length-1``
are valid, the rest is scratch space. Preallocation gives the server an exact memory figure up front
(:attr:`KVCache.nbytes`) and makes rollback (speculative decoding, retries) a matter of moving ``length`` back.
"""

from __future__ import annotations

import torch

from potluck.models.spec import ModelSpec


class KVCacheOverflowError(ValueError):
    """Writing would go past the cache's ``max_length``."""


class KVCache:
    """Keys and values of ``num_blocks`` consecutive blocks for ``batch_size`` sequences.

    ``keys[i]`` / ``values[i]`` belong to the i-th block *of the span that uses the cache* (local index) and have
    shape ``[batch, kv_heads, max_length, head_dim]``. For RoPE models keys are stored already rotated.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0) -> None:
        if len(keys) != len(values) or not keys:
            raise ValueError("KVCache needs the same positive number of key and value buffers")
        shape = keys[0].shape
        for buf in (*keys, *values):
            if buf.shape != shape or buf.dim() != 4:
                raise ValueError(
                    f"all KV buffers must share one 4-d shape, got {tuple(buf.shape)} vs {tuple(shape)}"
                )
        self.keys = keys
        self.values = values
        self.batch_size: int = shape[0]
        self.max_length: int = shape[2]
        if not 0 <= length <= self.max_length:
            raise ValueError(f"length {length} out of range [0, {self.max_length}]")
        self.length: int = length  # tokens already written (= position of the next token)
        # [B] left padding per row (a batch of prompts of different lengths): row b's first pads[b] positions
        # hold padding that attention masks and rotary positions skip; None: no row is padded
        self.pads: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        spec: ModelSpec,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """Allocate zeroed buffers for ``num_blocks`` blocks."""
        if num_blocks <= 0 or batch_size <= 0 or max_length <= 0:
            raise ValueError(
                f"num_blocks, batch_size and max_length must be positive, got {num_blocks}, {batch_size}, {max_length}"
            )
        shape = (batch_size, spec.num_kv_heads, max_length, spec.head_dim)  # [B, KVH, S, D]
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        return cls(keys, values)

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        """Memory held by all buffers, whether used or not."""
        return sum(buf.numel() * buf.element_size() for buf in (*self.keys, *self.values))

    def check_room(self, num_new: int) -> None:
        """Raise :class:`KVCacheOverflowError` if ``num_new`` more tokens do not fit."""
        if self.length + num_new > self.max_length:
            raise KVCacheOverflowError(
                f"KV cache overflow: {self.length} tokens cached + {num_new} new > max_length {self.max_length}"
            )

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values ``[B, KVH, T, D]`` of local block ``block`` at positions ``length..length+T-1``.

        Returns views of all valid keys/values ``[B, KVH, length+T, D]``. Does not advance ``length``: the span
        does that once after all its blocks ran, so every block writes at the same positions.
        """
        num_new = k.shape[2]
        self.check_room(num_new)
        end = self.length + num_new
        self.keys[block][:, :, self.length : end] = k
        self.values[block][:, :, self.length : end] = v
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]  # [B, KVH, L+T, D]

    def advance(self, num_new: int) -> None:
        self.check_room(num_new)
        self.length += num_new

    def rollback(self, position: int) -> None:
        """Forget tokens at positions ``>= position`` (the next write goes to ``position``)."""
        if not 0 <= position <= self.length:
            raise ValueError(f"cannot roll back to position {position}: cache holds {self.length} tokens")
        self.length = position

    def set_pads(self, pads: list[int] | torch.Tensor | None) -> None:
        """Declare each row's left padding (None or all zeros: none); positions past ``max_length`` are refused."""
        if pads is None:
            self.pads = None
            return
        pads = torch.as_tensor(pads, dtype=torch.long).cpu()
        if pads.shape != (self.batch_size,) or bool((pads < 0).any()) or bool((pads > self.max_length).any()):
            raise ValueError(f"pads must be {self.batch_size} integers in 0..{self.max_length}")
        self.pads = pads if bool(pads.any()) else None

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Replace row ``b`` by former row ``batch_indices[b]`` in every buffer (beam search), in place."""
        if batch_indices.dim() != 1 or batch_indices.shape[0] != self.batch_size:
            raise ValueError(
                f"batch_indices must have shape [{self.batch_size}], got {tuple(batch_indices.shape)}"
            )
        index = batch_indices.to(device=self.device, dtype=torch.long)
        for buf in (*self.keys, *self.values):
            # index_select makes a copy first, so overlapping source/destination rows are safe.
            buf[:, :, : self.length] = buf[:, :, : self.length].index_select(0, index)
        if self.pads is not None:
            self.pads = self.pads.index_select(0, index.cpu())

    def __repr__(self) -> str:
        return (
            f"KVCache(num_blocks={self.num_blocks}, batch_size={self.batch_size}, length={self.length}, "
            f"max_length={self.max_length}, dtype={self.dtype}, device={self.device})"
        )
