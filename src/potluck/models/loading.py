"""Load parts of a safetensors checkpoint: a span of blocks for a server, embeddings + head for a client.

Only the tensors asked for are read (``safetensors.safe_open`` reads single tensors), and for hub checkpoints only
the shards holding them are downloaded. Modules are built on the ``meta`` device and then take the loaded tensors
(``load_state_dict(assign=True)``), so no full-model random init is ever materialised.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open

from potluck.models.client_parts import ClientParts
from potluck.models.config_view import ConfigView, load_config_view
from potluck.models.family import ModelFamily, TensorSources
from potluck.models.quant import check_quant, quantize_module
from potluck.models.registry import get_family
from potluck.models.span import BlockSpan, check_block_range

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """The checkpoint is missing, not in safetensors format, or lacks tensors we need."""


def load_config(
    name_or_path: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PretrainedConfig:
    """HF config of a local directory or hub repo (honours ``HF_HUB_OFFLINE``). Imports transformers (seconds):
    what only reads attributes takes :func:`potluck.models.config_view.load_config_view` instead."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, revision=revision, token=token, cache_dir=cache_dir)


class SafetensorsCheckpoint:
    """Finds tensors in a single-file or sharded safetensors checkpoint; fetches files lazily."""

    def __init__(
        self,
        name_or_path: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name_or_path = str(name_or_path)
        self.revision, self.token = revision, token
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.is_local = os.path.isdir(self.name_or_path)
        self.weight_map: dict[str, str] = self._read_weight_map()

    def _fetch(self, filename: str) -> str:
        """Local path of ``filename``, downloading it from the hub if needed."""
        if self.is_local:
            path = os.path.join(self.name_or_path, filename)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint file {path} is missing")
            return path
        downloaded = hf_hub_download(
            self.name_or_path, filename, revision=self.revision, token=self.token, cache_dir=self.cache_dir
        )
        assert isinstance(downloaded, str)  # only dry runs return file info objects
        return downloaded

    def _try_fetch(self, filename: str) -> str | None:
        if self.is_local:
            path = os.path.join(self.name_or_path, filename)
            return path if os.path.isfile(path) else None
        try:
            return self._fetch(filename)
        except EntryNotFoundError:  # also raised offline when the file is not cached
            return None

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self._try_fetch(SAFETENSORS_INDEX)
        if index_path is not None:
            with open(index_path) as f:
                return dict(json.load(f)["weight_map"])
        single_path = self._try_fetch(SAFETENSORS_SINGLE)
        if single_path is not None:
            with safe_open(single_path, framework="pt") as f:
                return {name: SAFETENSORS_SINGLE for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        has_bin = self.is_local and any(
            os.path.isfile(os.path.join(self.name_or_path, name)) for name in _TORCH_BIN_FILES
        )
        raise CheckpointError(
            f"no safetensors weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}) found for {self.name_or_path!r}"
            + (" (found pytorch_model.bin)" if has_bin else "")
            + "; pytorch_model.bin checkpoints are not supported, convert the model to safetensors first"
            + ("" if self.is_local else " (or the files are not cached while HF_HUB_OFFLINE is set)")
        )

    def resolve(self, name: str, base_prefix: str) -> str | None:
        """Checkpoint name for ``name``; base-model checkpoints store it without ``base_prefix``."""
        if name in self.weight_map:
            return name
        if name.startswith(base_prefix) and name[len(base_prefix) :] in self.weight_map:
            return name[len(base_prefix) :]
        return None

    def read(
        self,
        wanted: Mapping[str, str],
        base_prefix: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> dict[str, torch.Tensor]:
        """Read tensors ``{our_key: checkpoint_name}``; floating tensors are cast to ``dtype``."""
        resolved = {key: self.resolve(name, base_prefix) for key, name in wanted.items()}
        missing = sorted(wanted[key] for key, name in resolved.items() if name is None)
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in total)" if len(missing) > 8 else "")
            raise CheckpointError(f"checkpoint {self.name_or_path!r} lacks tensors: {shown}")
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, name in resolved.items():
            assert name is not None
            by_file[self.weight_map[name]].append((key, name))
        out: dict[str, torch.Tensor] = {}
        for filename, items in by_file.items():
            with safe_open(self._fetch(filename), framework="pt", device="cpu") as f:
                for key, name in items:
                    tensor = f.get_tensor(name)
                    target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                    out[key] = tensor.to(device=device, dtype=target_dtype)
        return out


def load_span(
    name_or_path: str,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: PretrainedConfig | ConfigView | None = None,
    progress: bool = False,
    quant: str = "none",
) -> BlockSpan:
    """Blocks ``start..end-1`` with weights read from the checkpoint (and nothing else).

    ``progress``: show a tqdm bar over the blocks on stderr (a server's start-up may take minutes).
    ``quant`` (none | int8 | nf4) quantizes the blocks' linear layers with bitsandbytes (:mod:`potluck.models.quant`)
    block by block as they load, so the unquantized weights of at most one block are in memory at a time.
    """
    if config is None:
        config = load_config_view(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    family = get_family(config)
    spec = family.spec_from_config(config)
    check_block_range(spec, start, end)
    checkpoint = SafetensorsCheckpoint(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    with torch.device("meta"):
        span = BlockSpan(spec, family, start, end)
    quant = check_quant(quant)
    tensors: dict[str, torch.Tensor] = {}
    blocks = list(enumerate(span.blocks))
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc=f"loading blocks {start}:{end}", unit="block", file=sys.stderr)
    for local, block in blocks:  # block by block, so the bar moves as the shards are read
        wanted: dict[str, str] = {}
        assembled: dict[str, TensorSources] = {}  # our key -> sources, for tensors stored split up (experts)
        prefix = family.block_prefix(start + local)
        for key in block.state_dict():
            name, sources = prefix + key, family.block_tensor_sources(spec, key)
            if sources is None or checkpoint.resolve(name, family.base_prefix) is not None:
                wanted[key] = name
            elif isinstance(sources, str):
                wanted[key] = prefix + sources
            else:
                assembled[key] = [[prefix + part for part in parts] for parts in sources]
        block_tensors = checkpoint.read(wanted, family.base_prefix, dtype, device)
        if assembled:
            parts_wanted = {
                name: name for sources in assembled.values() for parts in sources for name in parts
            }
            parts = checkpoint.read(parts_wanted, family.base_prefix, dtype, device)
            for key, sources in assembled.items():
                # stack along a new dim 0 (experts) what is concatenated along dim 0 (e.g. gate and up projections)
                block_tensors[key] = torch.stack(
                    [torch.cat([parts.pop(name) for name in names]) for names in sources]
                )
        if quant != "none":  # quantize as we go: one block's full-precision weights in memory at a time
            block.load_state_dict(block_tensors, strict=True, assign=True)
            quantize_module(block, quant, device, dtype)
        else:
            tensors.update({f"blocks.{local}.{key}": t for key, t in block_tensors.items()})
    if quant != "none":
        return span.eval()
    span.load_state_dict(tensors, strict=True, assign=True)
    return span.eval()


def load_client_parts(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: PretrainedConfig | ConfigView | None = None,
) -> ClientParts:
    """Embeddings, (BLOOM) embedding norm, final norm and LM head (tied to the embeddings where configured)."""
    if config is None:
        config = load_config_view(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    family: ModelFamily = get_family(config)
    spec = family.spec_from_config(config)
    checkpoint = SafetensorsCheckpoint(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    with torch.device("meta"):
        parts = ClientParts(spec, family)
    wanted = {key: family.client_tensor_names[key] for key in parts.state_dict()}
    tensors = checkpoint.read(wanted, family.base_prefix, dtype, device)
    parts.load_state_dict(tensors, strict=True, assign=True)
    return parts.eval()
