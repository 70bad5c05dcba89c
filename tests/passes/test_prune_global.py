"""Tests of ``prune-global``: statistics required, layer selection, numerics, KV estimate."""

from __future__ import annotations

import functools

import pytest
import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
from condfx.l2a import record_route_stats
from condfx.passes import PassError, apply
from condfx.passes.route_attention import ROUTED
from condfx.patterns.routed import find_routed_layers

TASK = MQARConfig(vocab_size=32, num_pairs=2, gap=8, seq_len=16)


@functools.cache
def _captured():
    model = build_mqar_model(TASK, dim=32).eval()
    ids, _ = make_mqar_batch(TASK, 2, torch.Generator().manual_seed(0))
    return condfx.capture(model, (ids,)), ids


def _routed(record: bool = True):
    gm, ids = _captured()
    out = apply(gm, "route-attention{window=4}").graph_module
    with torch.no_grad():  # layer 0 routes some tokens, layer 1 (zero router) routes all
        find_routed_layers(out)[0].state.router_weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    if record:
        record_route_stats(out, [ids])
    return out, ids


def test_matches_layers_below_max_fraction():
    gm, ids = _routed()
    frac0 = find_routed_layers(gm)[0].routed_fraction
    assert 0 < frac0 < 1
    expected_gm, _ = _routed()
    find_routed_layers(expected_gm)[0].state.global_wo_weight.data.zero_()
    result = apply(gm, "prune-global{max_fraction=0.999}")
    pruned = result.graph_module
    report = result.reports[0]
    assert report.rewritten == 1 and report.skip_counts() == {"routes too often": 1}
    assert [x.layer for x in find_routed_layers(pruned)] == [1]
    assert len([n for n in pruned.graph.nodes if n.target is ROUTED]) == 1
    assert not any(".l2a." in n and n.startswith(find_routed_layers(gm)[0].prefix) for n, _ in pruned.named_parameters())
    assert report.params_added < 0
    assert report.cost_after.kv_cache_bytes_per_token < report.cost_before.kv_cache_bytes_per_token
    torch.testing.assert_close(pruned(ids), expected_gm(ids))


def test_matches_only_selected_layers():
    gm, _ = _routed()
    # issue 15 item 4: a pass that rewrote nothing is an error unless allow_partial=True
    result = apply(gm, "prune-global{max_fraction=1.0,layers=[1]}", allow_partial=True)
    assert result.reports[0].rewritten == 0 and result.reports[0].matched == 1
    with pytest.raises(PassError, match=r"prune-global matched 1 but rewrote none: routes too often \(layer 1"):
        apply(gm, "prune-global{max_fraction=1.0,layers=[1]}")


def test_rejects_before_statistics_were_recorded():
    gm, _ = _routed(record=False)
    with pytest.raises(PassError, match="needs routing statistics, but layer 0 has none recorded"):
        apply(gm, "prune-global{max_fraction=0.5}")


def test_rejects_missing_layer_and_plain_models():
    gm, _ = _routed()
    with pytest.raises(PassError, match=r"names layer 5, but the L2A layers are \[0, 1\]"):
        apply(gm, "prune-global{layers=[5]}")
    plain, _ = _captured()
    with pytest.raises(PassError, match="found no L2A layer"):
        apply(plain, "prune-global")
    with pytest.raises(ValueError, match=r"max_fraction must be a number in \[0, 1\]; got 2"):
        apply(gm, "prune-global{max_fraction=2}")


def test_share_prunes_the_layers_routing_least():
    gm, ids = _routed()  # layer 0 routes a fraction < 1, layer 1 every query
    expected_gm, _ = _routed()
    find_routed_layers(expected_gm)[0].state.global_wo_weight.data.zero_()
    result = apply(gm, "prune-global{share=0.5}")  # 1 of the 2 layers: the one routing least
    report = result.reports[0]
    assert report.rewritten == 1 and [x.layer for x in find_routed_layers(result.graph_module)] == [1]
    assert report.skipped == (("outside the pruned share",
                               "layer 1: routes 1.000, not among the 1 of 2 routing least (share 0.5)"),)
    torch.testing.assert_close(result.graph_module(ids), expected_gm(ids))
    both = apply(gm, "prune-global{share=1.0}").graph_module
    assert not find_routed_layers(both)


def test_share_that_rounds_to_no_layer_is_a_report_line_not_an_error():
    gm, ids = _routed()
    result = apply(gm, "prune-global{share=0.2}")  # floor(0.2 x 2 + 0.5) = 0 layers
    report = result.reports[0]
    assert report.rewritten == 0 and report.skip_counts() == {"outside the pruned share": 2}
    assert "outside the pruned share" in report.to_markdown()
    assert [x.layer for x in find_routed_layers(result.graph_module)] == [0, 1]
    torch.testing.assert_close(result.graph_module(ids), gm(ids))


def test_bad_input_share_out_of_range_or_beside_max_fraction():
    gm, _ = _routed()
    with pytest.raises(ValueError, match=r"PruneGlobalConfig\.share must be a number in \[0, 1\]; got 2"):
        apply(gm, "prune-global{share=2}")
    with pytest.raises(ValueError, match=r"takes max_fraction .* or share .*, not both; got max_fraction=0\.5, "
                                         r"share=0\.5\."):
        apply(gm, "prune-global{share=0.5,max_fraction=0.5}")
