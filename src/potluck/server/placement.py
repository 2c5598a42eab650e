"""The server's side of load balancing: how many blocks fit here, and the swarm as this server sees it."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from potluck.models import get_family
from potluck.models.spec import ModelSpec
from potluck.swarm.placement import auto_num_blocks

logger = logging.getLogger(__name__)

MEMORY_FRACTION = 0.8  # of the free memory, the rest is left for activations, the runtime and the OS


def block_bytes(hf_config: Any, dtype: torch.dtype) -> int:
    """Bytes of one block's weights, counted on a block built on the meta device (no memory used)."""
    family = get_family(hf_config)
    spec = ModelSpec.from_config(hf_config)
    with torch.device("meta"):
        block = family.make_block(spec, 0)
    return sum(p.numel() for p in block.parameters()) * torch.finfo(dtype).bits // 8


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


def size_num_blocks(hf_config: Any, dtype: torch.dtype, device: str, cache_tokens: int) -> int:
    """``--num-blocks`` when not given: as many blocks as fit beside the KV-cache budget."""
    free = int(free_memory_bytes(device) * MEMORY_FRACTION)
    n = auto_num_blocks(
        free, block_bytes(hf_config, dtype), cache_bytes_per_block(hf_config, dtype, cache_tokens),
        max_blocks=int(hf_config.num_hidden_layers),
    )  # fmt: skip
    logger.info("%.1f GiB free on %s: serving %d blocks", free / 2**30, device, n)
    return n
