"""The cached resolved config (models/config_view.py) says what transformers' own config object says, per family."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from potluck.models import load_config
from potluck.models.config_view import ConfigView, load_config_view
from potluck.models.registry import get_family, spec_from_config
from potluck.server.placement import block_bytes
from tiny_models import KINDS


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "configs"


@pytest.mark.parametrize("kind", KINDS)
def test_view_gives_the_same_spec_as_the_transformers_config(
    kind: str, tiny_checkpoint: Callable[..., str], cache: Path
) -> None:
    path = tiny_checkpoint(kind)
    real = load_config(path)
    first = load_config_view(path)  # resolved by transformers, then written
    (stored,) = list(cache.glob("*.json"))
    second = load_config_view(path)  # read back from the file
    assert stored.exists() and isinstance(second, ConfigView)
    assert get_family(first) is get_family(real) is get_family(second)
    assert spec_from_config(first) == spec_from_config(real) == spec_from_config(second)
    for quant in ("none", "int8"):
        assert block_bytes(second, torch.float32, quant) == block_bytes(real, torch.float32, quant)
    assert second.num_hidden_layers == real.num_hidden_layers  # BLOOM and Falcon through attribute aliases
    assert getattr(second, "no_such_field", "default") == "default"
    assert "_name_or_path" not in second.to_dict()  # keyed by content: the first directory is nobody's path


def test_an_edited_config_is_resolved_afresh(
    tiny_checkpoint: Callable[..., str], tmp_path: Path, cache: Path
) -> None:
    path = shutil.copytree(tiny_checkpoint("llama-tied"), tmp_path / "edited")
    assert load_config_view(str(path)).num_hidden_layers == 8
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 6}))
    assert load_config_view(str(path)).num_hidden_layers == 6
    assert len(list(cache.glob("*.json"))) == 2


def test_a_broken_cache_file_is_resolved_again(tiny_checkpoint: Callable[..., str], cache: Path) -> None:
    path = tiny_checkpoint("qwen3")
    load_config_view(path)
    (stored,) = list(cache.glob("*.json"))
    stored.write_text("{not json")
    assert load_config_view(path).model_type == "qwen3"
    assert json.loads(stored.read_text())["model_type"] == "qwen3"  # rewritten


def test_a_server_process_with_a_seen_config_never_imports_transformers(
    tiny_checkpoint: Callable[..., str], cache: Path
) -> None:
    path = tiny_checkpoint("mistral")
    load_config_view(path)
    code = (
        "import sys; import potluck.server.server; from potluck.cli.status import gather_status; "
        "from potluck.models.config_view import load_config_view; "
        f"assert load_config_view({path!r}).model_type == 'mistral'; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
