"""The decode rules table and the typed plans ``add-kv-cache`` reads: table consistency, schema-named
arguments, and one-sentence errors when passes do not compose."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import condfx
from condfx.codegen.onnx import LOWERINGS
from condfx.layouts import LAYOUTS
from condfx.passes import PassError
from condfx.passes.decode.attention import AttentionDecodeRule
from condfx.passes.decode.base import op_arg, set_op_args
from condfx.passes.decode_rules import DECODE_RULES
from condfx.passes.kv_quant.plan import PLAN_KEY, DecodeForm
from condfx.runtime.cache_table import CACHES
from tests._helpers import ToyStack


def _llama_gm():
    from condfx.models_zoo import build_zoo

    return condfx.capture(build_zoo("llama-tiny").eval(), (torch.zeros(2, 8, dtype=torch.long),))


def test_every_decode_rule_op_lowers_to_onnx_and_every_layout_has_a_cache():
    assert set(DECODE_RULES) <= set(LOWERINGS)
    assert set(LAYOUTS.values()) == set(CACHES)
    assert all(rule.pass_name for rule in DECODE_RULES.values())


def test_op_arg_reads_schema_names_and_defaults():
    gm = condfx.apply(_llama_gm(), "fuse-attention").graph_module
    node = next(n for n in gm.graph.nodes if n.target in DECODE_RULES)
    assert op_arg(node, "window") == 0 and op_arg(node, "q") is node.args[0]
    set_op_args(node, window=5)
    assert op_arg(node, "window") == 5
    with pytest.raises(KeyError, match="has no argument 'pseudo'"):
        op_arg(node, "pseudo")


def test_quantize_kv_plans_are_typed_and_name_their_nodes():
    gm = condfx.apply(_llama_gm(), "fuse-attention, quantize-kv{method=xquant,latent=svd,bits=2,group=8}").graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    plans = [n.meta[PLAN_KEY] for n in gm.graph.nodes if PLAN_KEY in n.meta]
    assert [p.form for p in plans] == [DecodeForm.STREAMS] * 2
    for plan in plans:
        assert [s.spec.name for s in plan.streams] == ["k", "v"]
        assert all(nodes[s.fq].target is torch.ops.condfx.fake_group_quantize.default for s in plan.streams)


def test_rejects_plan_whose_nodes_a_later_pass_removed():
    gm = condfx.apply(_llama_gm(), "fuse-attention, quantize-kv{method=xquant,latent=svd,bits=2,group=8}").graph_module
    node = next(n for n in gm.graph.nodes if PLAN_KEY in n.meta)
    plan = node.meta[PLAN_KEY]
    gone = dataclasses.replace(plan.streams[0], fq="fake_group_quantize_gone")
    node.meta[PLAN_KEY] = dataclasses.replace(plan, streams=(gone, *plan.streams[1:]))
    with pytest.raises(PassError, match=r"quantize-kv's plan for layer 0 names node 'fake_group_quantize_gone'.*"
                                        r"a pass after quantize-kv rewrote that layer"):
        condfx.apply(gm, "add-kv-cache")


class _NeedsPosition(AttentionDecodeRule):
    needs_position = True

    def rewire(self, node, layout, past, ctx):
        assert ctx.position is not None  # every layer bounded: P comes from the position layout
        return super().rewire(node, layout, past, ctx)


def test_matches_position_layout_for_a_rule_that_needs_the_position_when_every_layer_is_bounded(monkeypatch):
    # Issue 15 item 3 (decode for all-windowed models): this used to be refused ("every attention
    # layer keeps a bounded cache ... keep one full-attention layer"); P now comes from a
    # PositionLayout added after the attention layers.
    import condfx.passes.add_kv_cache as add_kv_cache
    from condfx.layouts import PositionLayout

    monkeypatch.setattr(add_kv_cache, "DECODE_RULES", {torch.ops.condfx.attention.default: _NeedsPosition()})
    model = ToyStack(layers=2, form="eager", window=3).eval()
    gm = condfx.capture(model, (torch.randn(2, 5, 16),))
    decode = condfx.apply(gm, "fuse-attention, add-kv-cache").graph_module
    layouts = decode.meta["condfx_kv"]
    assert [type(s) for s in layouts][-1] is PositionLayout and len(layouts) == 3
    assert [n.name for n in decode.graph.nodes if n.op == "placeholder"][-1] == "past_position"
