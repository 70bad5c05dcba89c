"""``condfx::kivi_cache_attention``: stepping a packed KIVI cache equals the teacher-forced op."""

from __future__ import annotations

import pytest
import torch

import condfx.ops  # noqa: F401
from condfx.ops.kv_quant import fake_quantize_reference, quantized_cache_attention_reference
from condfx.ops.quant_stream import empty_stream

B, H, HKV, D = 2, 4, 2, 8


def _teacher(q, k, v, bits, group, residual, sink, window=0):
    s = k.shape[2]
    k_hat = fake_quantize_reference(k, bits, group, -2, sink)
    rows = v.transpose(1, 2).reshape(B, s, HKV * D)
    v_hat = fake_quantize_reference(rows, bits, group, -1, sink).reshape(B, s, HKV, D).transpose(1, 2)
    return quantized_cache_attention_reference(q, k, v, k_hat, v_hat, 0.3, window, residual, group, 1, sink)


def _stepped(q, k, v, steps, bits, group, residual, sink, window=0):
    streams = [*empty_stream((B, HKV), D, bits, group, -2, torch.float32),
               *empty_stream((B, 1), HKV * D, bits, group, -1, torch.float32)]
    outs, p = [], 0
    for n in steps:
        sl = slice(p, p + n)
        out, *streams = torch.ops.condfx.kivi_cache_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], *streams, 0.3, window, bits, group, residual, sink)
        outs.append(out)
        p += n
    return torch.cat(outs, 2), streams


@pytest.mark.parametrize(("bits", "group", "residual", "sink", "window"),
                         [(2, 4, 3, 1, 0), (3, 8, 0, 0, 0), (4, 2, 5, 3, 6), (2, 4, 3, 0, 0), (4, 8, 0, 0, 0)])
def test_numerics_any_step_split_equals_teacher_forced(bits, group, residual, sink, window):
    g = torch.Generator().manual_seed(bits)
    s = 23
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h in (H, HKV, HKV))
    want = _teacher(q, k, v, bits, group, residual, sink, window)
    for steps in ([s], [5, 1, 1, 3, 1, 7, 1, 4], [1] * s):
        got, streams = _stepped(q, k, v, steps, bits, group, residual, sink, window)
        assert (got - want).abs().max().item() < 1e-5
    k_codes, k_scale, _, k_fp, v_codes, v_scale, _, v_fp = streams
    nq = max(0, s - residual - sink) // group * group
    assert k_codes.dtype == torch.uint8 and k_codes.shape == (B, HKV, nq, D * bits // 8)
    assert k_scale.shape == (B, HKV, nq // group, D) and k_fp.shape == (B, HKV, s - nq, D)
    nqv = max(0, s - residual - sink)
    assert v_codes.shape[2] == nqv and v_scale.shape == (B, 1, nqv, HKV * D // group)
    assert v_fp.shape == (B, 1, s - nqv, HKV * D)


def test_numerics_decode_step_reads_packed_codes_like_reference():
    """A one-token step with no sink or window reads the packed codes (``kivi_attend``): the same
    output and streams as the dequantizing reference."""
    from condfx.ops.kivi_cache import kivi_cache_attention_reference

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, 30, D, generator=g) for h in (H, HKV, HKV))
    _, streams = _stepped(q[:, :, :29], k[:, :, :29], v[:, :, :29], [29], 2, 4, 3, 0)
    last = (q[:, :, 29:], k[:, :, 29:], v[:, :, 29:])
    got = torch.ops.condfx.kivi_cache_attention(*last, *streams, 0.3, 0, 2, 4, 3, 0)
    want = kivi_cache_attention_reference(*last, *streams, 0.3, 0, 2, 4, 3, 0)
    assert (got[0] - want[0]).abs().max().item() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:], strict=True))


def test_numerics_cache_is_really_quantized():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, 20, D, generator=g) for h in (H, HKV, HKV))
    got, _ = _stepped(q, k, v, [20], 2, 4, 2, 0)
    dense = quantized_cache_attention_reference(q, k, v, k, v, 0.3, 0, 2, 4, 1, 0)
    assert (got - dense).abs().max().item() > 1e-2


def _step_with_k_stream(stats_rows: int, fp_tokens: int):
    """One 1-token step over a K stream of 8 packed tokens (group 4, residual 4) with the given
    scale rows and fp tokens, and an empty V stream."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, 1, D, generator=g) for h in (H, HKV, HKV))
    stats = torch.zeros(B, HKV, stats_rows, D, dtype=torch.float16)
    ks = [torch.zeros(B, HKV, 8, D // 4, dtype=torch.uint8), stats, stats, torch.zeros(B, HKV, fp_tokens, D)]
    vs = empty_stream((B, 1), HKV * D, 2, 4, -1, torch.float32)
    return torch.ops.condfx.kivi_cache_attention(q, k, v, *ks, *vs, 0.3, 0, 2, 4, 4, 0)


def test_rejects_stream_holding_more_than_policy():
    with pytest.raises(ValueError, match="more than its policy"):  # 9 tokens keep only 4 packed
        _step_with_k_stream(2, 0)


def test_rejects_scale_rows_not_matching_codes():
    with pytest.raises(ValueError, match="needs 2 scale rows"):
        _step_with_k_stream(3, 4)
