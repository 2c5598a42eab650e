"""A checkpoint's fingerprint: what servers announce and clients compare before sending anything.

Two servers (or a server and a client) may load different checkpoints under the same DHT name: a fine-tune, a
different revision, a random re-init with the same config. Their outputs would silently be garbage when mixed.
The fingerprint is ``"{spec hash}.{weights hash}"``:

* spec hash: sha256 of our normalised ``ModelSpec`` (sizes, heads, RoPE, norms, biases...), i.e. exactly what
  the block math depends on; not the raw HF config, whose serialised defaults change between transformers
  versions and would make equal models look different;
* weights hash: sha256 over the *client parts* of the checkpoint (embeddings, final norm, LM head; whatever
  ``ClientParts`` loads), each tensor as (name, shape, bytes after rounding to bfloat16), in name order.

Why those tensors: they are the only weights both sides can read cheaply. The client loads them anyway; a server
reads one or two extra tensors once at start (never the whole checkpoint), and neither side needs the other's
blocks. Rounding to bfloat16 first makes an fp32 checkpoint and its bf16 copy fingerprint alike, while any real
change of weights (another seed, another fine-tune of the embeddings) changes the hash.
What it cannot see: a fine-tune that changed only block weights and kept embeddings and head bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from potluck.models.client_parts import ClientParts
from potluck.models.config_view import load_config_view
from potluck.models.loading import SafetensorsCheckpoint
from potluck.models.registry import get_family

HASH_CHARS = 16  # hex chars kept of each sha256 (64 bits: collisions are not a concern for this purpose)


def spec_hash(spec: Any) -> str:
    """Hash of a ``ModelSpec`` (a frozen dataclass), stable across processes and library versions."""
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors: name, shape and bfloat16-rounded bytes of each, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:HASH_CHARS]


def checkpoint_fingerprint(
    name_or_path: str, *, revision: str | None = None, token: str | bool | None = None, config: Any = None
) -> str:
    """``"{spec hash}.{weights hash}"`` of a checkpoint, reading only its client-part tensors."""
    if config is None:
        config = load_config_view(name_or_path, revision=revision, token=token)
    family = get_family(config)
    spec = family.spec_from_config(config)
    with torch.device("meta"):
        keys = list(ClientParts(spec, family).state_dict())
    checkpoint = SafetensorsCheckpoint(name_or_path, revision=revision, token=token)
    wanted = {key: family.client_tensor_names[key] for key in keys}
    tensors = checkpoint.read(wanted, family.base_prefix, torch.bfloat16, "cpu")
    return f"{spec_hash(spec)}.{tensors_hash(tensors)}"
