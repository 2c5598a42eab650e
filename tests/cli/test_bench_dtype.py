"""`potluck bench serve --dtype`: which compute dtype `auto` stands for."""

from __future__ import annotations

import pytest
import torch

from potluck.cli.bench_serve import bench_dtype
from potluck.cli.main import build_parser


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"amx_bf16": True, "avx512_bf16": True}, "bfloat16"),
        ({"amx_bf16": False, "avx512_bf16": True}, "float32"),  # bf16 dot products without AMX tiles
        ({}, "float32"),  # a CPU (or build) that does not say
    ],
)
def test_auto_is_bf16_only_where_amx_multiplies_it(
    monkeypatch: pytest.MonkeyPatch, capabilities: dict[str, bool], expected: str
) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert bench_dtype("auto") == expected


def test_an_explicit_dtype_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert bench_dtype("float32") == "float32"
    assert bench_dtype("bfloat16") == "bfloat16"


def test_bench_serve_defaults_to_auto_and_refuses_other_dtypes() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "serve"]).dtype == "auto"
    assert parser.parse_args(["bench", "serve", "--dtype", "float32"]).dtype == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "serve", "--dtype", "float16"])
