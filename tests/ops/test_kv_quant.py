"""condfx::group_quantize / group_dequantize / fake_group_quantize / quantized_cache_attention."""

from __future__ import annotations

import pytest
import torch

import condfx.ops  # noqa: F401
from condfx.ops.kv_quant import (
    pack_codes,
    quantized_cache_attention_reference,
    quantized_count,
    unpack_codes,
)
from tests._helpers import dense_attention


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_numerics_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 16))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 16), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("dim", "group"), [(-1, 16), (-2, 4)])
def test_numerics_quantize_error_within_half_step(bits, dim, group):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 32)
    packed, scale, zero = torch.ops.condfx.group_quantize(x, bits, group, dim)
    assert scale.dtype == zero.dtype == torch.float16
    stats = (2, 3, 8, 32 // group) if dim == -1 else (2, 3, 8 // group, 32)
    assert tuple(scale.shape) == stats and packed.shape[-1] == 32 * bits // 8
    y = torch.ops.condfx.group_dequantize(packed, scale, zero, bits, group, dim, 32)
    step = scale.float().repeat_interleave(group, dim=dim)
    assert ((y - x).abs() <= step / 2 + 1e-2 * step + 1e-6).all()
    # more bits, smaller error; the fake op equals quantize + dequantize
    assert torch.equal(torch.ops.condfx.fake_group_quantize(x, bits, group, dim), y)


def test_numerics_constant_group_exact_and_passthrough_bits():
    x = torch.full((1, 4, 8), 0.75)
    assert torch.equal(torch.ops.condfx.fake_group_quantize(x, 2, 8, -1), x)
    y = torch.randn(1, 4, 8)
    assert torch.equal(torch.ops.condfx.fake_group_quantize(y, 32, 8, -1), y)
    assert torch.equal(torch.ops.condfx.fake_group_quantize(y, 16, 8, -1), y.half().float())


@pytest.mark.parametrize(
    ("bits", "group", "dim", "match"),
    [(5, 8, -1, "bits must be one of"), (2, 6, -1, "must divide the 16 channels"),
     (2, 8, 0, "dim must be -1")],
)
def test_rejects_bad_quant_args(bits, group, dim, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.condfx.group_quantize(torch.randn(2, 8, 16), bits, group, dim)


def test_numerics_quantized_count():
    assert [quantized_count(n, 2, 1) for n in range(5)] == [0, 0, 0, 1, 2]
    assert [quantized_count(n, 1, 4) for n in (0, 4, 5, 8, 9)] == [0, 0, 4, 4, 8]


def test_numerics_cache_attention_reduces_to_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    kh, vh = torch.randn_like(k), torch.randn_like(v)
    # a residual window longer than the sequence never reads the quantized copies
    out = quantized_cache_attention_reference(q, k, v, kh, vh, 0.3, 0, 9, 1, 1)
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    # residual 0, chunk 1: every earlier key is read quantized, each token's own key in full
    out = quantized_cache_attention_reference(q, k, v, kh, vh, 0.3, 0, 0, 1, 1)
    for t in range(9):
        k_t = torch.cat([kh[:, :, :t], k[:, :, t : t + 1]], 2)
        v_t = torch.cat([vh[:, :, :t], v[:, :, t : t + 1]], 2)
        want = dense_attention(q[:, :, t : t + 1], k_t, v_t, 0.3)
        torch.testing.assert_close(out[:, :, t : t + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("residual", "k_chunk", "v_chunk", "window", "sink"),
    [(3, 4, 1, 0, 0), (0, 1, 1, 0, 0), (2, 2, 2, 5, 0), (2, 4, 1, 0, 2)],
)
def test_numerics_cache_attention_op_equals_reference(residual, k_chunk, v_chunk, window, sink):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    kh, vh = k + 0.3 * torch.randn_like(k), v + 0.3 * torch.randn_like(v)
    args = (0.3, window, residual, k_chunk, v_chunk, sink)
    want = quantized_cache_attention_reference(q, k, v, kh, vh, *args)
    got = torch.ops.condfx.quantized_cache_attention(q, k, v, kh, vh, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # decode alignment: 3 queries at the end of 11 keys
    want = quantized_cache_attention_reference(q[:, :, -3:], k, v, kh, vh, *args)
    got = torch.ops.condfx.quantized_cache_attention(q[:, :, -3:], k, v, kh, vh, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
