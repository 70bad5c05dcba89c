"""``sink-window`` through the runtime: the bounded cache, decode = the teacher-forced forward, and
the ONNX bundle with the same caches."""

from __future__ import annotations

import functools

import pytest
import torch

import condfx
from condfx.layouts.sink_window import SinkWindowKVLayout
from condfx.runtime.caches import FullKVCache
from condfx.runtime.session import Session
from condfx.runtime.sink_window_cache import SinkWindowCache

SPEC = "sink-window{sink=2,window=4,layers=[1]}, fuse-attention"


@functools.cache
def _graphs():
    from condfx.models_zoo import build_zoo

    model = build_zoo("llama-tiny").eval()
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    full = condfx.apply(gm, SPEC).graph_module
    return full, condfx.apply(full, "add-kv-cache").graph_module


def test_numerics_decode_equals_teacher_forced_forward_with_a_bounded_cache():
    full, decode = _graphs()
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    session = Session.from_graph(decode)
    logits = [session.prefill(ids[:, :5])]
    logits += [session.step(ids[:, t : t + 1]) for t in range(5, 17)]
    logits.append(session.step(ids[:, 17:]))  # a 3-token step
    with torch.no_grad():
        want = full(ids)
    assert (torch.cat(logits, 1) - want).abs().max().item() < 1e-5
    assert [type(c) for c in session.caches] == [FullKVCache, SinkWindowCache]
    cache = session.caches[1]
    assert cache.stored == 2 + 4 - 1 and cache.length == 20
    assert cache.nbytes() == session.backend.layers[1].nbytes(20, batch=2)
    assert session.backend.layers[1] == SinkWindowKVLayout(1, 2, 16, torch.float32, sink=2, window_size=4)


def test_cache_keeps_the_sinks_and_the_last_window():
    cache = SinkWindowCache(1, 1, 2, sink=2, window=3)
    k = torch.arange(7.0).reshape(1, 1, 7, 1).expand(1, 1, 7, 2)
    cache.update(k, k.clone())
    assert cache.past()[0][0, 0, :, 0].tolist() == [0.0, 1.0, 5.0, 6.0]
    assert cache.length == 7


def test_numerics_onnx_bundle_has_the_same_caches(tmp_path):
    from condfx.export_bundle import export_decode_graph

    _, decode = _graphs()
    bundle = export_decode_graph(decode, tmp_path, verify=True)
    assert bundle.max_abs_diff < 1e-4
    assert [e["kind"] for e in bundle.manifest["layers"]] == ["full", "sink-window"]
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    a, b = Session.from_graph(decode), Session.from_onnx(tmp_path)
    out = [(s.prefill(ids[:, :4]), *(s.step(ids[:, t : t + 1]) for t in range(4, 12))) for s in (a, b)]
    assert [type(c) for c in a.caches] == [type(c) for c in b.caches]
    assert a.cache_bytes() == b.cache_bytes()
    assert (torch.cat(out[0], 1) - torch.cat(out[1], 1)).abs().max().item() < 1e-4


def test_cache_with_float16_storage_keeps_half_the_bytes_and_hands_back_float32():
    cache = SinkWindowCache(1, 2, 4, sink=1, window=3, storage=torch.float16)
    k = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(0))
    cache.update(k, 2 * k)
    pk, pv = cache.past()
    assert cache.k.dtype == torch.float16 and pk.dtype == torch.float32
    kept = torch.cat([k[:, :, :1], k[:, :, 4:]], 2)
    assert torch.equal(pk, kept.half().float()) and torch.equal(pv, (2 * kept).half().float())
    assert cache.nbytes() == 2 * 2 * 3 * 4 * 2  # K and V, 2 heads, 3 positions, 4 dims, 2 bytes
    assert cache.nbytes() == SinkWindowKVLayout(0, 2, 4, torch.float32, sink=1, window_size=3,
                                                ring_dtype="float16").nbytes(6)


@functools.cache
def _float16_ring_graphs():
    """The select form (sink 2, window 4) with KIVI at 16 bits and ring_float16: the ring's k/v rounded."""
    from condfx.models_zoo import build_zoo

    model = build_zoo("llama-tiny").eval()
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    spec = "route-attention{form=select,window=4,sink=2}, quantize-kv{method=kivi,bits=16,residual=0,ring_float16=true}"
    full = condfx.apply(gm, spec).graph_module
    return full, condfx.apply(full, "add-kv-cache").graph_module


def test_numerics_float16_ring_decode_equals_forward():
    full, decode = _float16_ring_graphs()
    rings = [x for x in decode.meta["condfx_kv"] if isinstance(x, SinkWindowKVLayout)]
    assert len(rings) == 2 and all(x.ring_dtype == "float16" for x in rings)
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(2))
    a = Session.from_graph(decode)
    out_a = [a.prefill(ids[:, :5]), *(a.step(ids[:, t : t + 1]) for t in range(5, 14))]
    with torch.no_grad():
        want = full(ids)
    assert (torch.cat(out_a, 1) - want).abs().max().item() < 1e-4  # the graph rounded what the ring keeps
    ring_caches = [c for c in a.caches if isinstance(c, SinkWindowCache)]
    assert len(ring_caches) == 2 and all(c.k.dtype == torch.float16 and c.stored == 5 for c in ring_caches)
    assert sum(c.nbytes() for c in ring_caches) == sum(x.nbytes(14) for x in rings) == 2 * 2 * 2 * 5 * 16 * 2


@pytest.mark.slow  # two pipelines and an ONNX export: about 2 min on the shared 2-core machine
def test_numerics_float16_ring_onnx_session_agrees():
    from condfx.runtime.onnx_backend import OnnxBackend

    _, decode = _float16_ring_graphs()
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(2))
    a, b = Session.from_graph(decode), Session(OnnxBackend.from_graph(decode))
    out_a = [a.prefill(ids[:, :5]), *(a.step(ids[:, t : t + 1]) for t in range(5, 14))]
    out_b = [b.prefill(ids[:, :5]), *(b.step(ids[:, t : t + 1]) for t in range(5, 14))]
    out_b = [b.prefill(ids[:, :5]), *(b.step(ids[:, t : t + 1]) for t in range(5, 14))]
    assert a.cache_bytes() == b.cache_bytes()
    assert (torch.cat(out_a, 1) - torch.cat(out_b, 1)).abs().max().item() < 1e-4
