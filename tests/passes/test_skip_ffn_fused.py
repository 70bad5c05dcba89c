"""The fused similarity policy (``condfx.countdown_masked_ffn``) makes the unfused graph's decisions.

The unfused reference is built here by expanding every fused node back into what the policy emitted
before (``condfx.masked_ffn`` plus the countdown's ATen ops); both graphs then run side by side, on
the full sequence (the vectorised path) and token by token through a Session (the batch-1 host path).
"""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch

import condfx
from condfx.ops.countdown_ffn import countdown_masked_ffn_eager
from condfx.ops.masked_ffn import add_row_observer, remove_row_observer
from condfx.passes import apply
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.op_args import op_arg
from condfx.passes.skip_ffn import COUNTDOWN_FFN, MASKED_FFN, measure_skip_fraction
from condfx.runtime import Session
from tests._data import require_data

aten = torch.ops.aten
SPEC = "fuse-attention, skip-ffn{threshold=0.5,span=2,cold_start=1,cold_end=1,warmup=2}"
_WEIGHTS = ("w_up", "b_up", "w_gate", "b_gate", "w_down", "b_down")


def _unfuse(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with each ``countdown_masked_ffn`` expanded into masked_ffn + ATen ops."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(gm)
    graph = gm.graph
    for node in [n for n in graph.nodes if n.target is COUNTDOWN_FFN]:
        a = {k: op_arg(node, k) for k in ("x", "h_in", "countdown", "warm", *_WEIGHTS, "kind", "act",
                                           "layout", "threshold", "span")}
        b = GraphBuilder(gm, node)
        execute = b.call(aten.eq.Scalar, a["countdown"], 0)
        if a["warm"] is not None:
            execute = b.call(aten.bitwise_or.Tensor, execute, a["warm"])
        fused = b.call(MASKED_FFN, a["x"], a["h_in"], execute, *(a[w] for w in _WEIGHTS), a["kind"], a["act"],
                       a["layout"])
        update, cos = b.call(operator.getitem, fused, 0), b.call(operator.getitem, fused, 1)
        trigger = b.call(aten.logical_and.default, execute, b.call(aten.ge.Scalar, cos, a["threshold"]))
        if a["warm"] is not None:
            trigger = b.call(aten.logical_and.default, trigger, b.call(aten.logical_not.default, a["warm"]))
        left = b.call(aten.clamp_min.default, b.call(aten.sub.Tensor, a["countdown"], 1), 0)
        nxt = b.call(aten.where.ScalarSelf, trigger, a["span"], left)
        outs = (update, nxt, execute)
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


@pytest.fixture(scope="module")
def graphs():
    from condfx.models_zoo import load

    model, _ = load(require_data("stories260K.bin"))
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    fused = apply(condfx.capture(model.eval(), (ids,)), SPEC).graph_module
    return fused, _unfuse(fused), ids


def test_one_fused_op_per_skipped_layer(graphs):
    fused, unfused, _ = graphs
    assert sum(n.target is COUNTDOWN_FFN for n in fused.graph.nodes) == 3  # 5 layers, 2 cold
    assert not any(n.target is MASKED_FFN for n in fused.graph.nodes)
    assert sum(n.target is MASKED_FFN for n in unfused.graph.nodes) == 3
    assert len(fused.graph.nodes) < len(unfused.graph.nodes) - 3 * 8


def test_full_sequence_same_decisions_and_logits(graphs):
    fused, unfused, ids = graphs
    with torch.no_grad():
        got, want = measure_skip_fraction(fused, ids), measure_skip_fraction(unfused, ids)
        assert 0 < got["fraction"] < 1
        assert list(got["per_node"].values()) == list(want["per_node"].values())
        assert torch.equal(fused(ids)[0], unfused(ids)[0])


@pytest.fixture(scope="module")
def decode_graphs(graphs):
    """The decode forms (``add-kv-cache``) of the fused and the unfused graph."""
    fused, unfused, _ = graphs
    return apply(fused, "add-kv-cache").graph_module, apply(unfused, "add-kv-cache").graph_module


def _decode(gm, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits of decode-form ``gm`` for a prompt of 2 then one token at a time (batch 1: the host
    path), and the executed row count of every masked FFN call in order."""
    calls: list[int] = []

    def seen(executed, rows):
        calls.append(executed)

    session = Session.from_graph(gm)
    add_row_observer(seen)
    try:
        with torch.no_grad():
            out = [session.prefill(ids[:, :2])]
            out += [session.step(ids[:, i : i + 1]) for i in range(2, ids.shape[1])]
    finally:
        remove_row_observer(seen)
    return torch.cat(out, 1), calls


def test_token_by_token_same_decisions_and_logits(graphs, decode_graphs):
    ids = graphs[2]
    got, got_calls = _decode(decode_graphs[0], ids[:1])
    want, want_calls = _decode(decode_graphs[1], ids[:1])
    assert got_calls == want_calls and 0 < sum(got_calls) < len(got_calls) - 3  # some rows skipped
    assert torch.equal(got, want)


def test_session_calls_the_op_body_without_dispatch(decode_graphs):
    """The torch Session's runner calls ``countdown_masked_ffn_eager`` (no custom-op dispatch) and
    drops run-time no-ops."""
    runner = Session.from_graph(decode_graphs[0]).backend.runner
    targets = [n.target for n in runner.graph.nodes]
    assert COUNTDOWN_FFN not in targets
    assert targets.count(countdown_masked_ffn_eager) == 3
    casts = [n for n in runner.graph.nodes if n.target is aten.to.dtype]  # same-dtype casts dropped
    assert all(n.args[0].meta["val"].dtype != n.args[1] for n in casts)
    assert aten._assert_tensor_metadata.default not in targets
    assert any(n.target is aten._assert_tensor_metadata.default for n in decode_graphs[0].graph.nodes)


@pytest.mark.parametrize("fn", [torch.ops.condfx.countdown_masked_ffn, countdown_masked_ffn_eager],
                         ids=["op", "eager"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_op_matches_the_formula(shape, fn):
    g = torch.Generator().manual_seed(1)
    d, f = 8, 16
    x, h = torch.randn(*shape, d, generator=g), torch.randn(*shape, d, generator=g)
    w = [torch.randn(f, d, generator=g), None, torch.randn(f, d, generator=g), None,
         torch.randn(d, f, generator=g), None]
    cases = [(left, warm, threshold) for left in range(3) for threshold in (-1.0, 2.0)
             for warm in (None, torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool))]
    for left, warm, threshold in cases:  # threshold -1: every executed row triggers; 2: none does
        countdown = torch.full(shape, left, dtype=torch.int64)
        update, nxt, execute = fn(x, h, countdown, warm, *w, "swiglu", "silu", "out_in", threshold, 3)
        want_exec = countdown.eq(0) | (warm if warm is not None else False)
        want_update, cos = torch.ops.condfx.masked_ffn(x, h, want_exec, *w, "swiglu", "silu", "out_in")
        trigger = want_exec & cos.ge(threshold) & ~(warm if warm is not None else torch.zeros_like(want_exec))
        assert torch.equal(execute, want_exec) and torch.equal(update, want_update)
        assert torch.equal(nxt, torch.where(trigger, 3, (countdown - 1).clamp_min(0)))


def test_op_rejects_bad_countdown():
    x = torch.zeros(1, 1, 4)
    w = [torch.zeros(8, 4), None, torch.zeros(8, 4), None, torch.zeros(4, 8), None]
    with pytest.raises(ValueError, match=r"countdown must be \(B, T\) int64"):
        torch.ops.condfx.countdown_masked_ffn(x, x, torch.zeros(1, 1), None, *w)
