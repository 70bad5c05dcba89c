"""QuantizedStream, KIVICache and XQuantCache: policy, exact bytes, rematerialisation."""

from __future__ import annotations

import pytest
import torch

from condfx.ops.kv_quant import fake_quantize_reference, stream_bytes_per_token
from condfx.runtime.quant_caches import (
    KIVICache,
    QuantizedStream,
    XQuantCache,
)


@pytest.mark.parametrize(("dim", "group"), [(-1, 8), (-2, 4)])
def test_numerics_stream_matches_fake_quant_and_counts_bytes(dim, group):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 23, 16)
    s = QuantizedStream((2, 3), 16, 3, group, dim, residual=5)
    for t in range(23):  # token by token, as decoding appends
        s.append(x[:, :, t : t + 1])
    nq = ((23 - 5) // s.chunk) * s.chunk
    assert s.quantized == nq and len(s) == 23
    want = fake_quantize_reference(x[:, :, :nq], 3, group, dim)
    torch.testing.assert_close(s.read(), torch.cat([want, x[:, :, nq:]], 2))
    stats = nq * 16 // group
    assert s.nbytes() == 2 * 3 * (nq * 16 * 3 // 8 + 2 * 2 * stats + (23 - nq) * 16 * 4)
    per_token = stream_bytes_per_token(16, 3, group, 5, s.chunk, 23, tail_bytes=4)
    assert s.nbytes() == pytest.approx(2 * 3 * 23 * per_token)


def test_numerics_kivi_cache_update_and_reorder():
    torch.manual_seed(0)
    cache = KIVICache(2, 2, 8, bits=2, group=4, residual=3)
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    cache.update(k[:, :, :6], v[:, :, :6])
    pk, pv = cache.past()
    cache.update(torch.cat([pk, k[:, :, 6:]], 2), torch.cat([pv, v[:, :, 6:]], 2))
    assert cache.length == cache.stored == 10 and cache.k.quantized == 4 and cache.v.quantized == 7
    pk, pv = cache.past()
    torch.testing.assert_close(pk[:, :, 4:], k[:, :, 4:])
    torch.testing.assert_close(pk[:, :, :4], fake_quantize_reference(k[:, :, :4], 2, 4, -2))
    rows = v[:, :, :7].transpose(1, 2).flatten(2)  # values grouped per token across heads
    want_v = fake_quantize_reference(rows, 2, 4, -1).unflatten(2, (2, 8)).transpose(1, 2)
    torch.testing.assert_close(pv[:, :, :7], want_v)
    cache.reorder(torch.tensor([1]))
    assert cache.past()[0].shape == (1, 2, 10, 8)
    torch.testing.assert_close(cache.past()[0][0], pk[1])
    assert cache.nbytes() == cache.k.nbytes() + cache.v.nbytes() < (k.nbytes + v.nbytes) // 2


def test_numerics_xquant_cache_rematerialises_svd_latent_exactly():
    torch.manual_seed(0)
    d, hkv, hd = 24, 2, 4
    wk, wv = torch.randn(hkv * hd, d), torch.randn(hkv * hd, d)
    uk, sk, vhk = torch.linalg.svd(wk.T, full_matrices=False)
    uv, sv, vhv = torch.linalg.svd(wv.T, full_matrices=False)
    up = {"k": sk[:, None] * vhk, "v": sv[:, None] * vhv}
    cache = XQuantCache(1, {"k": 8, "v": 8}, 32, 8, 0, up, hkv, hd)
    x = torch.randn(1, 5, d)
    cache.append(k=x @ uk, v=x @ uv)
    want_k = (x @ wk.T).reshape(1, 5, hkv, hd).transpose(1, 2)
    torch.testing.assert_close(cache.keys(), want_k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.values(), (x @ wv.T).reshape(1, 5, hkv, hd).transpose(1, 2),
                               atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == 2 * 5 * 8 * 4
    with pytest.raises(ValueError, match="needs streams"):
        cache.append(x=x)


def test_numerics_stream_keeps_sink_tokens():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 16)
    s = QuantizedStream((1,), 16, 2, 8, -1, residual=3, sink=2)
    s.append(x[:, :1])
    s.append(x[:, 1:])
    assert s.head.shape[1] == 2 and s.quantized == 15 and len(s) == 20
    got = s.read()
    torch.testing.assert_close(got[:, :2], x[:, :2])
    torch.testing.assert_close(got[:, 2:17], fake_quantize_reference(x[:, 2:17], 2, 8, -1))
    assert s.nbytes() == 15 * (4 + 2 * 2 * 2) + 5 * 16 * 4


def test_rejects_bad_stream_bits():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedStream((1,), 16, 8, 8, -1, 0)


def _kivi_spec():
    from condfx.layouts import StreamsLayout, StreamSpec

    streams = (StreamSpec("k", 2, 8, 2, 4, -2, 3, 1), StreamSpec("v", 1, 16, 2, 4, -1, 3, 1))
    return StreamsLayout(0, 2, 8, torch.float32, streams)


def test_graph_stream_cache_carries_what_the_graph_returns():
    """GraphStreamCache: past() is the eight tensors the op returned; length, bytes, reorder, reset."""
    from condfx.runtime.quant_caches import GraphStreamCache

    cache = GraphStreamCache(_kivi_spec(), batch=2)
    assert len(cache.past()) == cache.io_tensors == 8 and cache.stored == 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 8, generator=g) for h in (4, 2, 2))
    out = torch.ops.condfx.kivi_cache_attention(q, k, v, *cache.past(), 0.3, 0, 2, 4, 3, 1)
    cache.update(*out[1:])
    assert cache.length == cache.stored == 12 and cache.past()[0].shape[2] == 8  # (12 - 3 - 1) // 4 * 4
    assert cache.nbytes() == sum(t.nbytes for t in out[1:])
    cache.reorder(torch.tensor([1]))
    assert cache.batch == 1 and all(t.shape[0] == 1 for t in cache.past())
    torch.testing.assert_close(cache.past()[3], out[4][1:])
    cache.reset(3)
    assert cache.length == 0 and all(t.shape[0] == 3 and t.shape[2] == 0 for t in cache.past())


def test_rejects_graph_stream_cache_bad_update():
    from condfx.runtime.quant_caches import GraphStreamCache

    cache = GraphStreamCache(_kivi_spec(), batch=2)
    with pytest.raises(ValueError, match="needs 8 tensors; got 2"):
        cache.update(torch.zeros(1), torch.zeros(1))
    with pytest.raises(NotImplementedError, match="use the Session"):
        cache.append(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))


def test_numerics_float16_cache_for_kivi_16_bits():
    """quantize-kv{method=kivi,bits=16} decodes with a float16 K/V cache (half the float32 bytes)."""
    from condfx.models_zoo import build_zoo
    from condfx.runtime.session import Session

    model = build_zoo("llama-tiny").eval()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    dense = Session.from_model(model)
    half = Session.from_model(model, passes="fuse-attention, quantize-kv{method=kivi,bits=16,residual=0}")
    outs = {}
    for name, s in (("dense", dense), ("half", half)):
        outs[name] = torch.cat([s.prefill(ids[:, :8])] + [s.step(ids[:, t : t + 1]) for t in range(8, 20)], 1)
    assert type(half.caches[0]).__name__ == "Float16KVCache" and half.caches[0].k.dtype == torch.float16
    assert half.cache_bytes() * 2 == dense.cache_bytes()
    assert 0 < (outs["half"] - outs["dense"]).abs().max().item() < 1e-2


def _kivi_decode_case(seed, batch, kv_heads, q_heads, bits, group, residual, length, scale):
    """(cache, q, expected): a KIVI cache of ``length`` random tokens (head dim 32), one query step
    and SDPA (GQA) over the cache's dequantized K/V, the reference for ``cache.attend``."""
    torch.manual_seed(seed)
    cache = KIVICache(batch, kv_heads, 32, bits, group, residual=residual)
    cache.update(torch.randn(batch, kv_heads, length, 32), torch.randn(batch, kv_heads, length, 32))
    q = torch.randn(batch, q_heads, 1, 32)
    k, v = cache.past()
    return cache, q, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


@pytest.mark.parametrize(("bits", "group", "length"), [(2, 16, 100), (4, 8, 37), (2, 32, 20)])
def test_numerics_kivi_attend_on_codes_matches_dequantized_attention(bits, group, length):
    # batch 2, GQA 6 query heads over 2 KV heads, head dim 32; the K stream has whole groups
    # quantized plus a tail, the V stream per-token codes plus the residual window (20: no codes)
    cache, q, expected = _kivi_decode_case(0, 2, 2, 6, bits, group, 8, length, 0.2)
    torch.testing.assert_close(cache.attend(q, 0.2), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cache.attend(q, 0.2), expected, atol=2e-5, rtol=1e-5)  # buffers reused


@pytest.mark.parametrize("bits", [2, 4])
def test_numerics_code_table_unpacks_every_byte(bits):
    """One table gather per chunk gives each byte's codes in channel order, as ``unpack_codes`` does."""
    from condfx.ops.kivi_cache import Workspace, _unpacked_chunks
    from condfx.ops.kv_quant import unpack_codes

    packed = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    chunks = [x.clone() for _, x in _unpacked_chunks(packed, bits, 5, "test", Workspace())]  # 5, 5, 5, 1 rows
    assert torch.equal(torch.cat(chunks), unpack_codes(packed, bits, 16 * 8 // bits).float())


@pytest.mark.parametrize(("bits", "group", "length"), [(2, 16, 300), (4, 32, 333)])
def test_numerics_kivi_attend_in_chunks_matches_dequantized_attention(monkeypatch, bits, group, length):
    """Several unpacked chunks per K/V head (a chunk cut to a few groups): the same result as
    dequantize-then-attend, to 1e-5 relative."""
    import condfx.ops.kivi_cache as kc

    monkeypatch.setattr(kc, "_CHUNK_BYTES", 4 * group * 32 * 2)  # 2 K groups / a few V tokens per chunk
    cache, q, expected = _kivi_decode_case(1, 1, 3, 9, bits, group, 16, length, 0.125)
    got = cache.attend(q, 0.125)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
