"""Tests of ``fold-interleave``: exact folding, golden graph, skips, idempotence, errors."""

from __future__ import annotations

import re

import pytest

from condfx.graph_text import graph_text
from condfx.passes import PassError, apply
from condfx.passes.fold_interleave import FoldInterleave
from tests._helpers import max_abs_diff
from tests._iha import captured


def _gm(name="stories260K", spec="interleave-heads{P=3,init_noise=0.1,seed=1}"):
    gm, ids = captured(name)
    return apply(gm, spec).graph_module, ids


@pytest.mark.parametrize(
    ("name", "spec"),
    [("stories260K", "interleave-heads{P=3,init_noise=0.1,seed=1}"),
     ("stories260K", "interleave-heads{P=2,window=8,collapse=global,causal=token,init_noise=0.2}"),
     ("gpt2-tiny", "interleave-heads{P=2,init_noise=0.1}")],
)
def test_numerics_fold_is_exact(name, spec):
    gm, ids = _gm(name, spec)
    expected = gm(ids)
    folded = apply(gm, "fold-interleave").graph_module
    assert max_abs_diff(folded(ids), expected) < 1e-5


def test_matches_removes_mixes_and_widens_projections():
    gm, _ = _gm()
    result = FoldInterleave()(gm)
    out = result.graph_module
    assert result.modified and result.report.rewritten == result.report.matched == 5
    text = graph_text(out)
    assert "einsum.default('bmtd,mhp->bhtpd'" not in text
    names = dict(out.named_parameters())
    assert not any("iha_alpha" in n for n in names)
    assert "layers.0.attention.wq.weight" not in names  # the unfolded projection is gone
    # stories260K: H = 8, Hkv = 4, D = 8, d = 64, P = 3
    assert names["layers.0.attention.iha_fold_q_weight"].shape == (8 * 3 * 8, 64)
    assert names["layers.0.attention.iha_fold_k_weight"].shape == (4 * 3 * 8, 64)


def test_golden_folded_projection():
    gm, _ = _gm()
    text = graph_text(FoldInterleave()(gm).graph_module)
    block = ["aten.linear.default(", "layers.0.attention.iha_fold_q_weight)",
             "aten.unflatten.int(", ", -1, [8, 3, 8])", "aten.permute.default(", "[0, 2, 1, 3, 4])",
             "aten.flatten.using_ints(", "condfx.interleaved_attention.default("]
    pos = 0
    for line in block:  # CHECK lines, in order
        pos = text.index(line, pos)


def test_idempotent_second_run_is_a_no_op():
    gm, _ = _gm()
    once = FoldInterleave()(gm).graph_module
    again = FoldInterleave()(once)
    assert not again.modified and set(again.report.skip_counts()) == {
        "input is not a mixing einsum (already folded)"
    }


def test_rejects_qk_norm_between_projection_and_mix():
    gm, _ = _gm("qwen3-tiny", "interleave-heads{P=2}")
    result = FoldInterleave()(gm)
    assert not result.modified
    assert result.report.skip_counts() == {"mixing input is not a plain projection": 2}


def test_rejects_graph_without_interleaved_attention():
    gm, _ = captured("llama-tiny")
    msg = "fold-interleave found no condfx.interleaved_attention node to fold: run interleave-heads first"
    with pytest.raises(PassError, match=re.escape(msg)):
        apply(gm, "fold-interleave")
