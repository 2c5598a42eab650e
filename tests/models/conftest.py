"""Shared fixtures for model tests: tiny checkpoints (built once per session) and their HF oracles."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

# tests/ holds tiny_models.py, shared with other test packages; pytest's default rootdir-relative import mode
# only puts this directory on sys.path.
_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """``tiny_checkpoint(kind)`` -> path of a saved tiny model, built once per session and kind."""
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            cache[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(kind.replace("-", "_")))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint: Callable[..., str]) -> Callable[[str], Any]:
    """``hf_model(kind)`` -> transformers model (eager attention, fp32, eval) loaded from the same checkpoint."""
    import transformers

    cache: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = transformers.AutoModelForCausalLM.from_pretrained(
                tiny_checkpoint(kind), attn_implementation="eager", dtype=torch.float32
            ).eval()
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def local_model(tiny_checkpoint: Callable[..., str]) -> Callable[[str], Any]:
    """``local_model(kind)`` -> potluck LocalCausalLM (fp32, CPU) loaded from the same checkpoint."""
    from potluck.models import LocalCausalLM

    cache: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = LocalCausalLM.from_pretrained(tiny_checkpoint(kind))
        return cache[kind]

    return get
