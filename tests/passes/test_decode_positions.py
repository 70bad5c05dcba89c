"""``passes/decode/positions.plan_positions``: each position source rewritten by what it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import condfx
from condfx.passes import PassError
from condfx.passes.decode.positions import plan_positions

pytestmark = pytest.mark.usefixtures("one_thread")


class _Sources(nn.Module):
    """ids (B, T) → logits-like (B, T, 8) through one position source picked by ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.emb, self.pos = kind, nn.Embedding(16, 8), nn.Embedding(32, 8)

    def forward(self, ids):
        x = self.emb(ids)
        b, t = ids.shape
        if self.kind == "cumsum-ones":  # OPT: positions from attention_mask.cumsum(1)
            mask = torch.ones(b, t, dtype=torch.long, device=ids.device)
            return x + self.pos(torch.cumsum(mask, 1) * mask - 1 + 2)
        if self.kind == "enumerate":  # MoE dispatch: an arange over the call's B*T rows
            flat = x.reshape(b * t, 8)
            order = torch.argsort(flat[:, 0])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(b * t, device=ids.device)
            return flat[order][inverse].reshape(b, t, 8)
        twos = torch.full((b, t), 2, dtype=torch.long, device=ids.device)  # cumsum of a non-ones fill
        return x + self.pos(torch.cumsum(twos, 1))


def _plan(kind: str):
    gm = condfx.capture(_Sources(kind).eval(), (torch.zeros(2, 5, dtype=torch.long),))
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return plan_positions(gm, ids, "add-kv-cache")


def test_matches_cumsum_of_ones_offset_and_enumeration_left_alone():
    plan = _plan("cumsum-ones")
    assert [n.target for n in plan.cumsums] == [torch.ops.aten.cumsum.default] and not plan.aranges
    plan = _plan("enumerate")
    assert plan.offset == () and [why for _, why in plan.left] == ["enumerates the call's rows, not positions"]


def test_rejects_cumsum_of_other_fill_naming_the_node():
    with pytest.raises(PassError, match=r"position-dependent value 'cumsum\w*' is not an arange\(T\).*a cumsum "
                                        r"of something other than a ones fill"):
        _plan("cumsum-twos")
