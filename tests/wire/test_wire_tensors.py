"""TensorMeta / WireLimits validation and uncompressed round trips of every wire dtype."""

from __future__ import annotations

import pytest
import torch

from potluck.wire import (
    DEFAULT_LIMITS,
    WIRE_DTYPES,
    ProtocolError,
    TensorLimitError,
    TensorMeta,
    WireLimits,
    check_meta,
    decode_tensor,
    encode_tensor,
)


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype)


SHAPES = [(), (0,), (2, 0, 3), (7,), (2, 3, 5), (1, 2, 3, 4, 5)]


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    t = sample(WIRE_DTYPES[name], shape)
    meta, payload = encode_tensor(t)
    assert meta.dtype == name and meta.shape == shape and meta.compression == "none"
    assert meta.nbytes == len(payload) == t.numel() * t.element_size()
    out = decode_tensor(meta, bytes(payload))
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t)


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
def test_roundtrip_non_contiguous(name: str) -> None:
    base = sample(WIRE_DTYPES[name], (6, 8, 10))
    for t in (base.transpose(0, 2), base[:, ::2, 1:7], base.expand(2, 6, 8, 10), base[3, :, 4]):
        assert not t.is_contiguous()
        meta, payload = encode_tensor(t)
        out = decode_tensor(meta, payload)
        assert out.is_contiguous() and torch.equal(out, t)


def test_bf16_bit_exact() -> None:
    t = torch.randn(3, 17).to(torch.bfloat16)
    t[0, 0] = float("nan")
    t[0, 1] = float("-inf")
    meta, payload = encode_tensor(t)
    out = decode_tensor(meta, payload)
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_encode_detaches_and_aliases_contiguous_input() -> None:
    t = torch.randn(4, 4, requires_grad=True)
    meta, payload = encode_tensor(t)
    assert torch.equal(decode_tensor(meta, payload), t.detach())


def test_decode_is_zero_copy_into_writable_buffers() -> None:
    t = torch.arange(12, dtype=torch.int32).view(3, 4)
    meta, payload = encode_tensor(t)
    buf = bytearray(payload)
    out = decode_tensor(meta, buf)
    out[0, 0] = 99  # writable, and shares memory with buf
    assert int.from_bytes(buf[:4], "little") == 99
    ro = decode_tensor(meta, bytes(payload))  # read-only input is copied, result stays writable
    ro += 1
    assert torch.equal(ro, t + 1)


def test_encode_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="float64"):
        encode_tensor(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="complex64"):
        encode_tensor(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="dense"):
        encode_tensor(torch.eye(3).to_sparse())
    with pytest.raises(TypeError):
        encode_tensor([1, 2, 3])  # type: ignore[arg-type]


def meta(**kw: object) -> TensorMeta:
    fields: dict[str, object] = {"dtype": "float32", "shape": (2, 3), "nbytes": 24}
    fields.update(kw)
    return TensorMeta.model_validate(fields)


@pytest.mark.parametrize(
    ("m", "limits", "pattern"),
    [
        (meta(shape=(2, -3)), DEFAULT_LIMITS, "negative dimension"),
        (meta(nbytes=25), DEFAULT_LIMITS, "nbytes 25 does not match.*expected 24"),
        (meta(dtype="complex64"), DEFAULT_LIMITS, "dtype 'complex64' is not allowed"),
        (meta(dtype="object"), DEFAULT_LIMITS, "dtype 'object' is not allowed"),
        (meta(dtype="float64"), DEFAULT_LIMITS, "dtype 'float64' is not allowed"),
        (
            meta(),
            WireLimits(allowed_dtypes=frozenset({"float16"})),
            r"not allowed \(allowed: \['float16'\]\)",
        ),
        (meta(shape=(1,) * 6, nbytes=4), DEFAULT_LIMITS, "ndim 6 exceeds max_ndim=5"),
        (meta(shape=(1 << 20, 1 << 10), nbytes=1 << 32), DEFAULT_LIMITS, "exceeds max_elements"),
        (meta(shape=(0, 1 << 40), nbytes=0), DEFAULT_LIMITS, "exceeds max_elements"),
        (meta(shape=(100,), nbytes=400), WireLimits(max_elements=99), "max_elements=99"),
        (meta(shape=(1000,), nbytes=4000), WireLimits(max_bytes=1000), "nbytes 4000 exceeds max_bytes=1000"),
        (meta(nbytes=-1), DEFAULT_LIMITS, "nbytes -1"),
        (meta(dtype="int64", compression="fp16", nbytes=12), DEFAULT_LIMITS, "only to floating dtypes"),
        (meta(compression="int8", nbytes=10), DEFAULT_LIMITS, "block_size None"),
        (meta(compression="int8", block_size=0, nbytes=10), DEFAULT_LIMITS, "block_size 0"),
        (meta(compression="fp16", block_size=4, nbytes=12), DEFAULT_LIMITS, "only valid with int8"),
        (meta(compression="int8", block_size=4, nbytes=10), DEFAULT_LIMITS, "expected 14"),
    ],
)
def test_check_meta_rejects(m: TensorMeta, limits: WireLimits, pattern: str) -> None:
    with pytest.raises(TensorLimitError, match=pattern):
        check_meta(m, limits)
    with pytest.raises(TensorLimitError):
        decode_tensor(m, b"\0" * max(0, min(m.nbytes, 64)), limits)


def test_meta_is_strict_and_frozen() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TensorMeta.model_validate({"dtype": "float32", "shape": (2, "3"), "nbytes": 24})
    with pytest.raises(ValidationError):
        TensorMeta.model_validate({"dtype": "float32", "shape": (2, 3), "nbytes": 24, "extra": 1})
    with pytest.raises(ValidationError):
        meta().nbytes = 3  # type: ignore[misc]


def test_decode_rejects_wrong_payload_size_and_bad_bools() -> None:
    m, payload = encode_tensor(torch.ones(3))
    with pytest.raises(ProtocolError, match="payload has 11 bytes, meta says 12"):
        decode_tensor(m, bytes(payload)[:11])
    bm, _ = encode_tensor(torch.tensor([True, False]))
    with pytest.raises(ProtocolError, match="bool tensor payload"):
        decode_tensor(bm, b"\x01\x02")
