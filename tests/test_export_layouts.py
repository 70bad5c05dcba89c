"""Cache layouts through the bundle: the torch Session and ``Session.from_onnx`` build the same caches
from the same layouts (the manifest's ``layers``), hold the same bytes and agree on the logits."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import condfx
from condfx.export_bundle import export_decode_graph
from condfx.layouts import LAYOUTS, layout_from_json
from condfx.runtime.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")

# The methods whose bundles no other test exports (kivi, xquant x / svd / cl and klt bundles are
# exported by tests/codegen/onnx/test_kv_quant_onnx.py); one export costs ~10 s of CI.
QUANTIZED = {
    "kivi-16": "quantize-kv{method=kivi,bits=16,residual=0}",
    "kivi-rotated-split": "quantize-kv{method=kivi,bits=2,k_bits=4,group=8,residual=4,rotate=true}",
    "kivi-split-16": "quantize-kv{method=kivi,bits=2,k_bits=16,group=8,residual=4,sink=1}",
    "xquant-16": "quantize-kv{method=xquant,latent=svd,bits=16,group=8,residual=4,sink=1}",
}


@functools.cache
def _model():
    from condfx.models_zoo import build_zoo

    return build_zoo("llama-tiny").eval()


def _decode(session, ids):
    steps = [session.prefill(ids[:, :6])] + [session.step(ids[:, t : t + 1]) for t in range(6, 9)]
    steps.append(session.step(ids[:, 9:]))
    return torch.cat(steps, 1)


# The passes that change attention without quantizing the cache (route-attention, with and without
# prune-global, needs router statistics: test_numerics_routed_bundle_runs_the_torch_sessions_caches).
EXACT = {
    "fuse-attention": "fuse-attention",
    "interleave-heads": "interleave-heads{P=2,window=4,init_noise=0.1,layers=[0]}, fuse-attention",
    "sink-window": "sink-window{sink=2,window=4,layers=[1]}, fuse-attention",
}
SPECS = {**EXACT, **{name: f"fuse-attention, {spec}" for name, spec in QUANTIZED.items()}}
KINDS = {"fuse-attention": {"full"}, "interleave-heads": {"interleaved", "full"},
         "sink-window": {"full", "sink-window"}, "kivi-16": {"float16"}}


# about 20-30 s each on 2 cores: CI exports one bundle per cache kind not exported elsewhere in CI (the full
# cache: test_cli_export and the runtime tests' stories bundle; the sink-window ring: test_sink_window_cache),
# -m slow every spec
_SLOW_SPECS = {"kivi-rotated-split", "kivi-split-16", "xquant-16", "interleave-heads", "fuse-attention", "sink-window"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_SPECS else n for n in SPECS])
def test_numerics_attention_pass_bundle_runs_the_torch_sessions_caches(name, tmp_path):
    """One exported bundle per pass that changes attention: the ONNX Runtime session gets the cache
    classes of the torch session (pseudo rows, a sinks + window cache, float16 for kivi bits=16, packed
    streams for the other quantize-kv methods), the same bytes, and logits within 1e-4 (1e-3 for
    quantized caches: the same cache contents, packed by each engine). kivi-16 is issue 13's manifest
    bug: its bundle (which did not even export before) now says float16 and ``Session.from_onnx``
    keeps a ``Float16KVCache``."""
    gm = condfx.capture(_model(), (torch.zeros(2, 8, dtype=torch.long),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        decode = condfx.apply(gm, f"{SPECS[name]}, add-kv-cache").graph_module
        bundle = export_decode_graph(decode, tmp_path, verify=False)
    torch_session, onnx_session = Session.from_graph(decode), Session.from_onnx(tmp_path)
    kinds = {entry["kind"] for entry in bundle.manifest["layers"]}
    assert kinds == KINDS.get(name, {"streams"})
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = _decode(torch_session, ids), _decode(onnx_session, ids)
    assert [type(c) for c in onnx_session.caches] == [type(c) for c in torch_session.caches]
    assert onnx_session.backend.layers == torch_session.backend.layers
    assert onnx_session.cache_bytes() == torch_session.cache_bytes()
    assert onnx_session.cache_bytes() == sum(x.nbytes(12, batch=2) for x in torch_session.backend.layers)
    assert (got - want).abs().max().item() < (1e-4 if name in EXACT else 1e-3)


def test_layouts_round_trip_through_json_and_reject_unknown_kinds():
    from condfx.layouts import (
        Float16KVLayout,
        FullKVLayout,
        InterleavedKVLayout,
        StreamsLayout,
        StreamSpec,
        WindowKVLayout,
    )

    spec = StreamSpec("k", 2, 8, 2, 4, -2, 3, 1)
    layouts = [FullKVLayout(0, 2, 8, torch.float32), WindowKVLayout(1, 2, 8, torch.float16, window_size=4),
               InterleavedKVLayout(2, 2, 8, torch.float32, pseudo_rows=2), Float16KVLayout(3, 2, 8, torch.float32),
               StreamsLayout(4, 2, 8, torch.float32, (spec,), 0)]
    layouts += [cls(5, 2, 8, torch.float32) for cls in LAYOUTS.values()]  # every kind, its defaults
    assert {x.kind for x in layouts} == set(LAYOUTS)
    for x in layouts:
        assert layout_from_json(x.to_json()) == x
        assert sum(t.nbytes for t in x.empty_past(3)) == x.nbytes(0, batch=3)
    with pytest.raises(ValueError, match=r"kind 'ring' \(written by condfx 9\.9\) is not one this condfx knows"):
        layout_from_json({"kind": "ring", "layer": 0}, written_by="9.9")


@pytest.mark.parametrize("dim", [-1, -2])
def test_half_stream_function_matches_op(dim):
    """The float16 stream (bits 16) in ONNX Runtime equals ``condfx.quantized_stream`` step by step."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from condfx.codegen.onnx import DOMAIN
    from condfx.codegen.onnx.quantized_stream import quantized_stream_functions
    from condfx.ops.quant_stream import HALF, empty_stream

    function = quantized_stream_functions()[4 if dim == -1 else 5]
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    inputs = {"codes": f16, "scale": f16, "zero": f16, "fp": f32, "new": f32}
    outputs = {"full": f32, "hat": f32, "codes_out": f16, "scale_out": f16, "zero_out": f16, "fp_out": f32}
    node = helper.make_node(function.name, list(inputs), list(outputs), domain=DOMAIN, group=4, residual=2, sink=1)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, t, [f"{n}{i}" for i in range(4)]) for n, t in inputs.items()],
        [helper.make_tensor_value_info(n, t, [f"{n}{i}" for i in range(4)]) for n, t in outputs.items()])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 19, 16, generator=torch.Generator().manual_seed(0))
    stream, p = empty_stream((2, 1), 16, HALF, 4, dim, torch.float32), 0
    for n in (6, 1, 5, 1, 6):
        full, hat, *want = torch.ops.condfx.quantized_stream(*stream, x[:, :, p : p + n], HALF, 4, dim, 2, 1)
        got = sess.run(None, dict(zip(inputs, [*(t.numpy() for t in stream), x[:, :, p : p + n].numpy()],
                                      strict=True)))
        np.testing.assert_allclose(got[0], full.numpy(), atol=1e-6)
        np.testing.assert_allclose(got[1], hat.numpy(), atol=1e-6)
        assert [g.shape for g in got[2:]] == [tuple(w.shape) for w in want]
        stream, p = [torch.from_numpy(g) for g in got[2:]], p + n
    assert want[0].dtype == torch.float16 and want[0].shape[2] == 16  # (19 - 2 - 1) tokens packed


def test_numerics_routed_bundle_runs_the_torch_sessions_caches(tmp_path):
    """route-attention (window cache + the global branch's full cache): the bundle's session equals
    the torch session (classes, bytes, logits within 1e-4)."""
    from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
    from condfx.l2a import record_route_stats
    from condfx.patterns.routed import find_routed_layers

    task = MQARConfig(vocab_size=32, num_pairs=2, gap=8, seq_len=16)
    model = build_mqar_model(task, dim=32).eval()
    pair, _ = make_mqar_batch(task, 2, torch.Generator().manual_seed(0))
    routed = condfx.apply(condfx.capture(model, (pair,)), "route-attention{window=4}").graph_module
    with torch.no_grad():
        find_routed_layers(routed)[0].state.router_weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    record_route_stats(routed, [pair[:1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        decode = condfx.apply(routed, "add-kv-cache").graph_module
        export_decode_graph(decode, tmp_path, verify=False)
    torch_session, onnx_session = Session.from_graph(decode), Session.from_onnx(tmp_path)
    ids = pair
    want, got = _decode(torch_session, ids[:, :12]), _decode(onnx_session, ids[:, :12])
    assert [type(c) for c in onnx_session.caches] == [type(c) for c in torch_session.caches]
    assert [x.kind for x in torch_session.backend.layers] == ["window", "full", "window", "full"]
    assert onnx_session.cache_bytes() == torch_session.cache_bytes()
    assert onnx_session.cache_bytes() == sum(x.nbytes(12, batch=2) for x in torch_session.backend.layers)
    assert (got - want).abs().max().item() < 1e-4
