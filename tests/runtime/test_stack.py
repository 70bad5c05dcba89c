"""The stack through one graph and one cache set: route-attention, prune-global, quantize-kv and
skip-ffn on stories260K; the torch and ONNX Runtime sessions generate the same greedy tokens, and the
cache is measured from the session's tensors against a dense float16 cache. Order rules: one sentence
naming both passes when a combination cannot compose."""

from __future__ import annotations

import functools

import pytest
import torch

import condfx
from condfx.l2a import record_route_stats
from condfx.layouts import StreamsLayout
from condfx.passes.base import PassError
from condfx.patterns.routed import find_routed_layers
from condfx.runtime.session import Session, TorchBackend
from tests._iha import captured

WINDOW, NEW = 8, 16
STACK = ("prune-global{max_fraction=0.5}, quantize-kv{method=kivi,bits=4,group=8,residual=8}, "
         "skip-ffn{threshold=0.5}")


@functools.cache
def _stacked():
    gm, ids = captured("stories260K")
    routed = condfx.apply(gm, f"route-attention{{window={WINDOW}}}").graph_module
    record_route_stats(routed, [ids])  # untrained (zero) routers route every query
    with torch.no_grad():  # as if calibration found layers 1 and 3 rarely routing: prune-global drops them
        for r in find_routed_layers(routed):
            if r.layer in (1, 3):
                r.state.route_stats.copy_(torch.tensor([1.0, 100.0], dtype=torch.float64))
    result = condfx.apply(routed, STACK)
    return result, condfx.apply(result.graph_module, "add-kv-cache").graph_module, ids


def _greedy(session: Session, prompt: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    logits = [session.prefill(prompt)[:, -1]]
    tokens = [int(logits[-1].argmax(-1))]
    for _ in range(NEW - 1):
        logits.append(session.step(torch.tensor([[tokens[-1]]]))[:, -1])
        tokens.append(int(logits[-1].argmax(-1)))
    return tokens, logits


@pytest.mark.slow  # about 90 s of CPU: capture, five passes, two exports of the decode graph
def test_numerics_stack_torch_and_onnx_sessions_agree_and_cache_is_quantized(one_thread):
    pytest.importorskip("onnxruntime")
    from condfx.runtime.onnx_backend import OnnxBackend

    result, decode, ids = _stacked()
    names = [r.pass_name for r in result.reports]
    assert names == ["prune-global", "quantize-kv", "skip-ffn"] and all(r.rewritten for r in result.reports)
    layouts = decode.meta["condfx_kv"]
    kinds = [type(x) for x in layouts]
    # every window ring and every kept global branch is a quantized stream; no plain K/V cache is left
    assert set(kinds) == {StreamsLayout} and sum(x.window == WINDOW for x in layouts) == 5
    assert len(layouts) == 8  # 5 window rings + the global caches of layers 0, 2, 4
    torch_s, onnx_s = Session(TorchBackend(decode)), Session(OnnxBackend.from_graph(decode))
    prompt = ids[:1, :8]
    t_tokens, t_logits = _greedy(torch_s, prompt)
    o_tokens, o_logits = _greedy(onnx_s, prompt)
    assert t_tokens == o_tokens
    assert max((a - b).abs().max().item() for a, b in zip(t_logits, o_logits, strict=True)) < 1e-3
    # bytes per token measured from the session's cache tensors vs a dense float16 cache of 5 layers
    tokens = prompt.shape[1] + NEW - 1
    measured = torch_s.cache_bytes() / tokens
    dense_fp16 = 5 * 2 * 4 * 8 * 2  # layers x (K, V) x heads x head dim x 2 bytes
    assert measured == sum(x.nbytes(tokens) for x in layouts) / tokens
    assert measured < 4 * dense_fp16  # float32 tails at 23 tokens; the report states the long-context figure
    report = result.reports[1]
    assert report.kv_bytes_per_token < report.fp16_bytes_per_token  # at 4096 tokens, from the layouts


def test_bad_input_quantize_then_route_names_both_passes():
    gm, _ = captured("stories260K")
    with pytest.raises(PassError, match="route-attention cannot follow quantize-kv: .*put route-attention first"):
        condfx.apply(gm, "quantize-kv{method=kivi,bits=4,group=8}, route-attention{window=8}")


def test_bad_input_xquant_after_route_names_both_passes():
    gm, _ = captured("stories260K")
    with pytest.raises(PassError, match=r"quantize-kv\{method=xquant\} cannot follow route-attention: .*method=kivi"):
        condfx.apply(gm, "route-attention{window=8}, quantize-kv{method=xquant,bits=4,group=8}")


@pytest.mark.slow  # builds the whole stack
def test_bad_input_prune_after_quantize_names_both_passes():
    result, _, _ = _stacked()
    with pytest.raises(PassError, match="prune-global cannot follow quantize-kv"):
        condfx.apply(result.graph_module, "prune-global{max_fraction=0.99}")


def test_order_rules_are_a_table_of_known_passes():
    from condfx.passes.decode_rules import ORDER_RULES
    from condfx.passes.registry import PASSES

    assert ORDER_RULES and all(a in PASSES and b in PASSES for a, b in ORDER_RULES)


@pytest.mark.slow  # about 30 s of CPU: capture, two passes, 29 decode calls
def test_numerics_kivi_window_ring_stays_bounded_and_exact(one_thread):
    gm, _ = captured("stories260K")
    spec = f"route-attention{{window={WINDOW}}}, quantize-kv{{method=kivi,bits=4,group=4,residual=4}}"
    routed = condfx.apply(gm, spec).graph_module
    decode = condfx.apply(routed, "add-kv-cache").graph_module
    rings = [x for x in decode.meta["condfx_kv"] if getattr(x, "ring", False)]
    assert len(rings) == 5 and all(x.window == WINDOW for x in rings)
    session = Session(TorchBackend(decode))
    x = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(1))
    full = routed(x)
    logits = [session.prefill(x[:, :20])[:, -1]] + [session.step(x[:, i : i + 1])[:, -1] for i in range(20, 48)]
    torch.testing.assert_close(torch.stack(logits[:-1], 1), full[:, 19:47], atol=5e-3, rtol=0)
    ring_caches = [c for c, lay in zip(session.caches.caches, decode.meta["condfx_kv"], strict=True) if lay in rings]
    assert all(c.stored < WINDOW + 4 for c in ring_caches) and session.position == 48
    assert session.cache_bytes() == sum(lay.nbytes(48) for lay in decode.meta["condfx_kv"])


@pytest.mark.slow  # minutes on a loaded 2-core machine (capture, passes, decode re-export, CLI)
def test_generate_cli_with_routed_attention_and_kivi_caches(capsys):
    """``condfx generate --passes 'route-attention{...}, quantize-kv{method=kivi}'``: the Session builds
    one quantized cache per attention op (window ring and global branch), past the window."""
    import json

    from condfx.cli import main
    from tests._data import require_data

    model = str(require_data("stories260K.bin"))
    prompt = " ".join(["Once upon a time there was a little dog who liked to play in the park."] * 6)
    code = main(["generate", model, "--prompt", prompt, "--max-new-tokens", "6", "--json",
                 "--passes", "route-attention{window=16}, quantize-kv{method=kivi,bits=4,group=8,residual=8}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["new_tokens"] == 6


def test_numerics_select_form_global_cache_quantized_and_decoded():
    """route-attention{form=select} (window + 4 sinks) then KIVI: the global branch's full-length cache
    is quantized, the sink-window ring stays float, and the torch Session decodes like the forward."""
    gm, _ = captured("stories260K")
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # about half of the queries route
        for r in find_routed_layers(sel):
            r.state.router_weight.normal_(0, 1.0, generator=g)
            r.state.threshold.fill_(0.0)
    result = condfx.apply(sel, "quantize-kv{method=kivi,bits=2,group=8,residual=8}")
    report = result.reports[0]
    assert report.rewritten == 5 and report.kv_bytes_per_token < report.fp16_bytes_per_token / 2
    decode = condfx.apply(result.graph_module, "add-kv-cache").graph_module
    kinds = [type(x).__name__ for x in decode.meta["condfx_kv"]]
    assert kinds.count("StreamsLayout") == 5 and kinds.count("SinkWindowKVLayout") == 5
    assert {x.ring_dtype for x in decode.meta["condfx_kv"] if type(x).__name__ == "SinkWindowKVLayout"} == {""}  # model dtype
    x = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = result.graph_module(x)
        session = Session(TorchBackend(decode))
        logits = [session.prefill(x[:, :30])[:, -1]] + [session.step(x[:, i : i + 1])[:, -1] for i in range(30, 39)]
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 29:39], atol=1e-4, rtol=1e-4)
