"""A checkpoint's config as transformers resolves it, kept as JSON so servers and commands start without transformers.

Importing transformers and resolving a config class costs ~3.3 s of a ~6.5 s start-up on a 2-core CPU (the
family config modules pull in ``torch.distributed.tensor`` and accelerate through transformers' kernel hooks), and
a server, ``potluck status`` or a ``--blocks`` check only reads attributes of the config. So the first time a
``config.json`` is seen, transformers resolves it as always (``AutoConfig``: family defaults, attribute aliases such
as BLOOM's ``n_layer`` for ``num_hidden_layers``, derived properties) and every resolved value is written to
``<cache>/configs/<key>.json``; later loads read that file. The key hashes the ``config.json`` bytes and the
installed transformers version, so an edited config or an upgraded transformers resolves afresh.

Clients keep the real config object (:func:`potluck.models.loading.load_config`): they import transformers for
generation anyway, and users may pass ``model.config`` to transformers APIs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from potluck.paths import cache_root, write_json_atomically

FORMAT = 1  # bump when what is stored per config changes
LOCATION_FIELDS = ("_name_or_path", "name_or_path")  # where a config was read from, not what it says


class ConfigView:
    """Read-only attribute access to a resolved transformers config (``getattr(view, name, default)`` works)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the model config has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a ConfigView is read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"ConfigView(model_type={self._values.get('model_type')!r})"


def resolved_values(config: Any) -> dict[str, Any]:
    """Every attribute value of a transformers config that JSON can hold: its fields (``to_json_string``), its
    ``attribute_map`` aliases, and its properties (e.g. Falcon's ``head_dim``, ``rotary``)."""
    from transformers.utils import logging as hf_logging

    values: dict[str, Any] = json.loads(config.to_json_string(use_diff=False))
    for where in LOCATION_FIELDS:  # the cache is keyed by content: the first directory seen is nobody's path
        values.pop(where, None)
    names = set(getattr(type(config), "attribute_map", {}))
    names |= {
        name for klass in type(config).__mro__ for name, v in vars(klass).items() if isinstance(v, property)
    }
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # deprecated properties (torch_dtype, use_return_dict) log when read
    try:
        for name in sorted(names):
            if name.startswith("_") or name in values or name in LOCATION_FIELDS:
                continue
            with warnings.catch_warnings(), contextlib.suppress(Exception):  # a property may warn or refuse
                warnings.simplefilter("ignore")
                value = getattr(config, name)
                if json.loads(json.dumps(value)) == value:
                    values[name] = value
    finally:
        hf_logging.set_verbosity(verbosity)
    return values


def _config_file(
    name_or_path: str,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    local = Path(name_or_path) / "config.json"
    if Path(name_or_path).is_dir():
        return local  # a missing file is reported by transformers below, in its words
    from huggingface_hub import hf_hub_download

    hub_cache = os.fspath(cache_dir) if cache_dir is not None else None
    return Path(
        hf_hub_download(name_or_path, "config.json", revision=revision, token=token, cache_dir=hub_cache)
    )


def _key(raw: bytes) -> str:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    return hashlib.sha256(b"%d|%s|" % (FORMAT, version.encode()) + raw).hexdigest()[:32]


def load_config_view(
    name_or_path: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ConfigView:
    """The config of a local directory or hub repo, resolved by transformers once per ``config.json`` and version."""
    path = _config_file(str(name_or_path), revision, token, cache_dir)
    try:
        raw = path.read_bytes()
    except OSError:
        raw = None
    cached = cache_root() / "configs" / f"{_key(raw)}.json" if raw is not None else None
    if cached is not None:
        with contextlib.suppress(OSError, ValueError):
            return ConfigView(json.loads(cached.read_text()))
    from potluck.models.loading import load_config

    values = resolved_values(
        load_config(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir)
    )
    if cached is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the next start-up its seconds
            write_json_atomically(cached, values)  # two processes resolving one config write the same bytes
    return ConfigView(values)
