"""The cached sample checkpoints: builders racing for one recipe, and a leftover unfinished directory."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from potluck.cli.sample_models import _build

# Imported before the threads start: transformers' lazy module can fail a first import made by two threads at
# once. The race under test is ours, between builders.
_PRELOADED = (LlamaConfig, LlamaForCausalLM)

TINY = dict(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64,
)  # fmt: skip


def test_concurrent_builders_of_one_recipe_both_succeed(tmp_path: Path) -> None:
    """Two demos (or test workers) building the same checkpoint at once: each writes its own directory, the first
    rename wins, and neither fails nor leaves a partial directory behind."""
    path = tmp_path / "tiny-v1"
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def build() -> None:
        start.wait()
        try:
            _build(path, TINY, seed=0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((path / "potluck_recipe.json").read_text()) == {"recipe": "tiny-v1", "seed": 0}
    assert (path / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]


def test_an_unfinished_directory_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "tiny-v1"
    path.mkdir()
    (path / "stray.bin").write_bytes(b"half a shard")  # no recipe file: an interrupted older build
    _build(path, TINY, seed=0)
    assert (path / "potluck_recipe.json").is_file() and not (path / "stray.bin").exists()
