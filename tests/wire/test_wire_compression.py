"""Codec accuracy and edge cases (fp16 / bf16 / int8 blockwise absmax)."""

from __future__ import annotations

import math

import pytest
import torch

from potluck.wire import INT8_BLOCK_SIZE, TensorMeta, decode_tensor, encode_tensor
from potluck.wire.compression import effective_compression, payload_nbytes


def roundtrip(t: torch.Tensor, compression: str, **kw: int) -> tuple[TensorMeta, torch.Tensor]:
    meta, payload = encode_tensor(t, compression, **kw)
    return meta, decode_tensor(meta, bytes(payload))


@pytest.fixture
def normal() -> torch.Tensor:
    return torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))  # [1M] N(0,1)


def test_fp16_error_bound(normal: torch.Tensor) -> None:
    meta, out = roundtrip(normal, "fp16")
    assert meta.compression == "fp16" and meta.nbytes == normal.numel() * 2
    assert out.dtype == torch.float32
    err = (out - normal).abs()
    # round-to-nearest: relative error <= 2^-11 for normal fp16 values (N(0,1) never hits subnormals much)
    assert bool((err <= normal.abs() * 2.0**-11 + 2.0**-25).all())
    print(f"fp16 max abs error on N(0,1): {err.max().item():.3g}")


def test_bf16_error_bound(normal: torch.Tensor) -> None:
    meta, out = roundtrip(normal, "bf16")
    assert meta.compression == "bf16" and meta.nbytes == normal.numel() * 2
    err = (out - normal).abs()
    assert bool((err <= normal.abs() * 2.0**-8).all())
    print(f"bf16 max abs error on N(0,1): {err.max().item():.3g}")


def test_int8_error_on_normal(normal: torch.Tensor) -> None:
    meta, out = roundtrip(normal, "int8")
    n_blocks = math.ceil(normal.numel() / INT8_BLOCK_SIZE)
    assert meta.nbytes == 4 * n_blocks + normal.numel() and meta.block_size == INT8_BLOCK_SIZE
    err = (out - normal).abs()
    absmax = normal.view(-1, INT8_BLOCK_SIZE).abs().amax(dim=1, keepdim=True)  # [blocks, 1]
    bound = absmax / 254 * (1 + 1e-5) + 1e-7  # half a quantisation step per block
    assert bool((err.view(-1, INT8_BLOCK_SIZE) <= bound).all())
    max_err = err.max().item()
    print(f"int8 (block {INT8_BLOCK_SIZE}) max abs error on N(0,1): {max_err:.4f}, mean {err.mean():.4f}")
    assert max_err < 0.025  # absmax of 2048 N(0,1) samples is ~3.5-5


@pytest.mark.parametrize("n", [1, 5, 2047, 2049, 3 * 2048 + 5, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_tail_block_and_dtypes(n: int, dtype: torch.dtype) -> None:
    x = (torch.randn(n) * 3).to(dtype)  # [n]
    meta, out = roundtrip(x, "int8")
    assert meta.nbytes == 4 * math.ceil(n / 2048) + n
    assert out.dtype == dtype and out.shape == x.shape
    xf, of = x.float(), out.float()
    for start in range(0, n, 2048):
        blk = xf[start : start + 2048]
        step = blk.abs().max().item() / 127
        # + one ulp of the output dtype for the final cast back
        tol = step / 2 * (1 + 1e-5) + blk.abs().max().item() * torch.finfo(dtype).eps
        assert (of[start : start + 2048] - blk).abs().max().item() <= tol


def test_int8_all_zero_and_mixed_blocks() -> None:
    z = torch.zeros(3, 1000)
    _, out = roundtrip(z, "int8", block_size=256)
    assert torch.equal(out, z)
    x = torch.zeros(1024)
    x[512:768] = torch.linspace(-2, 2, 256)  # only the third 256-block is non-zero
    _, out = roundtrip(x, "int8", block_size=256)
    assert torch.equal(out[:512], x[:512]) and torch.equal(out[768:], x[768:])
    assert (out - x).abs().max().item() <= 2 / 254 + 1e-6


def test_int8_tiny_and_nonfinite_values_stay_contained() -> None:
    x = torch.full((8,), 1e-45)  # subnormal absmax: must not blow up to inf/NaN
    _, out = roundtrip(x, "int8", block_size=4)
    assert torch.isfinite(out).all()
    y = torch.randn(12)
    y[1] = float("nan")
    y[6] = float("inf")
    _, out = roundtrip(y, "int8", block_size=4)
    assert out[:4].isnan().all() and not torch.isfinite(out[4:8]).all()  # poisoned blocks
    assert (out[8:] - y[8:]).abs().max().item() <= y[8:].abs().max().item() / 254 + 1e-6  # others fine


def test_int8_empty_and_scalar() -> None:
    for t in (torch.zeros(0, 4), torch.tensor(2.5)):
        meta, out = roundtrip(t, "int8")
        assert out.shape == t.shape and torch.allclose(out, t, atol=0.02)
        assert meta.nbytes == (0 if t.numel() == 0 else 5)


def test_fp16_saturates_instead_of_inf() -> None:
    x = torch.tensor([1e6, -1e6, float("inf"), 1.0])
    _, out = roundtrip(x, "fp16")
    assert out.tolist() == [65504.0, -65504.0, 65504.0, 1.0]


def test_compression_only_applies_to_shrinking_float() -> None:
    assert effective_compression(torch.int64, "int8") == "none"
    assert effective_compression(torch.bool, "fp16") == "none"
    assert effective_compression(torch.float16, "bf16") == "none"
    assert effective_compression(torch.bfloat16, "fp16") == "none"
    assert effective_compression(torch.float16, "int8") == "int8"
    assert effective_compression(torch.float32, "bf16") == "bf16"
    with pytest.raises(ValueError, match="unknown compression"):
        effective_compression(torch.float32, "zstd")
    ids = torch.arange(10)
    meta, out = roundtrip(ids, "int8")
    assert meta.compression == "none" and torch.equal(out, ids)


def test_payload_nbytes() -> None:
    assert payload_nbytes("none", torch.bfloat16, 10, None) == 20
    assert payload_nbytes("fp16", torch.float32, 10, None) == 20
    assert payload_nbytes("int8", torch.float32, 4097, 2048) == 4 * 3 + 4097


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compression", ["none", "fp16", "bf16", "int8"])
def test_cuda_tensors_encode(compression: str) -> None:
    x = torch.randn(4, 8, 300, device="cuda").transpose(1, 2)  # non-contiguous, on GPU
    meta, payload = encode_tensor(x, compression)
    out = decode_tensor(meta, payload)
    assert out.device.type == "cpu" and out.shape == x.shape
    assert torch.allclose(out, x.cpu(), atol=0.05, rtol=0.01)
