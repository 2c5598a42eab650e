"""The server's side of load balancing: how many blocks fit here, and the swarm as this server sees it."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from potluck.models import get_family
from potluck.models.quant import check_quant, quantized_block_bytes
from potluck.models.spec import ModelSpec
from potluck.swarm.placement import auto_num_blocks

logger = logging.getLogger(__name__)

MEMORY_FRACTION = 0.8  # of the free memory, the rest is left for activations, the runtime and the OS


def block_bytes(hf_config: Any, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes of one block's weights (linear layers quantized as ``quant``), counted on a meta-device block."""
    family = get_family(hf_config)
    spec = ModelSpec.from_config(hf_config)
    with torch.device("meta"):
        block = family.make_block(spec, 0)
    return quantized_block_bytes(block, check_quant(quant), dtype)


def cache_bytes_per_block(hf_config: Any, dtype: torch.dtype, cache_tokens: int) -> int:
    spec = ModelSpec.from_config(hf_config)
    return 2 * cache_tokens * spec.num_kv_heads * spec.head_dim * torch.finfo(dtype).bits // 8


def free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:  # Linux: what can be allocated without swapping
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def size_num_blocks(
    hf_config: Any, dtype: torch.dtype, device: str, cache_tokens: int, quant: str = "none"
) -> int:
    """``--num-blocks`` when not given: as many blocks (at their quantized size) as fit beside the KV cache."""
    free = int(free_memory_bytes(device) * MEMORY_FRACTION)
    n = auto_num_blocks(
        free, block_bytes(hf_config, dtype, quant), cache_bytes_per_block(hf_config, dtype, cache_tokens),
        max_blocks=int(hf_config.num_hidden_layers),
    )  # fmt: skip
    logger.info("%.1f GiB free on %s: serving %d blocks (%s)", free / 2**30, device, n, quant)
    return n


def choose_quant(requested: str, device: str, *, fits_unquantized: bool) -> str:
    """``--quant`` resolved: ``auto`` is nf4 on CUDA when the span would not fit unquantized, else none (CPU
    inference with bitsandbytes' CPU kernels is slower than plain bf16/fp32 matmuls)."""
    if requested != "auto":
        return check_quant(requested)
    return "nf4" if device.startswith("cuda") and not fits_unquantized else "none"


def span_fits(
    hf_config: Any, dtype: torch.dtype, device: str, cache_tokens: int, num_blocks: int | None
) -> bool:
    """Whether ``num_blocks`` blocks (None: the whole model) fit in free memory unquantized beside the cache."""
    wanted = int(hf_config.num_hidden_layers) if num_blocks is None else num_blocks
    try:
        return size_num_blocks(hf_config, dtype, device, cache_tokens) >= wanted
    except ValueError:  # not even one block fits
        return False
