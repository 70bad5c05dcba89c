"""Tests of ``runtime/runner_rewrites``: the torch Session's runner with its per-op overhead cut."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from condfx.runtime import Session, TorchBackend
from condfx.runtime.runner_rewrites import rotate_half_sin, slim_runner
from condfx.runtime.session import grow_in_place
from tests.runtime import STORIES, decode_graph

pytestmark = pytest.mark.usefixtures("one_thread")
aten = torch.ops.aten


class _AsWritten(TorchBackend):
    """The decode graph as ``add-kv-cache`` wrote it (``cat`` of the past, the custom ops)."""

    def __init__(self, gm, runner=None):
        super().__init__(gm)
        self.runner, self.in_place = (gm, 0) if runner is None else (runner, self.in_place)


def _token_by_token(backend, ids):
    session = Session(backend)
    out = [session.prefill(ids[:, :3])]
    out += [session.step(ids[:, i : i + 1]) for i in range(3, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", [STORIES, "llama-tiny"])
def test_numerics_slim_runner_token_by_token(name):
    _, result = decode_graph(name)
    gm = result.graph_module
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    slim = _token_by_token(TorchBackend(gm), ids)
    unslimmed = _token_by_token(_AsWritten(gm, grow_in_place(gm, slim=False)[0]), ids)
    written = _token_by_token(_AsWritten(gm), ids)
    # bit for bit on this CPU; a tolerance far below what a wrong sign or eps moves (1e-2 and more), so a
    # torch.rms_norm kernel that reduces in another order on another CPU does not fail the suite
    torch.testing.assert_close(slim, unslimmed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slim, written, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [STORIES, "llama-tiny"])
def test_matches_every_norm_and_rope(name):
    model, result = decode_graph(name)
    runner, _ = grow_in_place(result.graph_module, slim=False)
    graph = copy.deepcopy(runner.graph)
    done = slim_runner(graph)
    layers = model.info.n_layers
    assert done["rms_norm"] == 2 * layers + 1 and done["rope"] == 2 * layers
    targets = [n.target for n in graph.nodes]
    assert targets.count(torch.rms_norm) == 2 * layers + 1 and targets.count(torch.roll) == 2 * layers
    assert not {aten.rsqrt.default, aten.neg.default, aten.pow.Tensor_Scalar} & set(targets)
    assert targets.count(rotate_half_sin) == 1  # the per-layer sin unsqueezes were shared first
    assert len(graph.nodes) < 0.8 * len(runner.graph.nodes)


def _rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _slim(fn, *args):
    """(slimmed GraphModule, counts, the function's values) for ``fn`` traced to ATen with metadata."""
    gm = make_fx(fn, tracing_mode="fake")(*args)
    done = slim_runner(gm.graph)
    gm.recompile()
    return gm, done, fn(*args)


def test_numerics_fused_forms_equal_the_chains():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 40, generator=g), torch.randn(40, generator=g)
    gm, done, want = _slim(_rms, x, w)
    assert done["rms_norm"] == 1
    torch.testing.assert_close(gm(x, w), want, rtol=1e-6, atol=1e-6)
    q, cos, sin = torch.randn(2, 4, 3, 16, generator=g), torch.randn(1, 1, 3, 16, generator=g), torch.randn(
        1, 1, 3, 16, generator=g)
    gm, done, want = _slim(_rope, q, cos, sin)
    assert done["rope"] == 1 and torch.equal(gm(q, cos, sin), want)


@pytest.mark.parametrize("case", ["bf16 norm", "mean over dim 1", "cube", "swapped halves", "broadcast sin"])
def test_rejects_forms_that_are_not_the_fused_ones(case):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 40, generator=g), torch.randn(40, generator=g)
    q, cos = torch.randn(2, 4, 3, 16, generator=g), torch.randn(1, 1, 3, 16, generator=g)
    if case == "bf16 norm":  # rms_norm would compute in float32 where the chain computes in bf16
        fn, args, kind = _rms, (x.bfloat16(), w.bfloat16()), "rms_norm"
    elif case == "mean over dim 1":
        fn, args, kind = (lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5))), (x, w), "rms_norm"
    elif case == "cube":
        fn, args, kind = (lambda x, w: w * (x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True) + 1e-5))), (x, w), "rms_norm"
    elif case == "swapped halves":  # cat(-x1, x2) is not a rotation
        fn, args, kind = (lambda x, c, s: x * c + torch.cat([-x[..., :8], x[..., 8:]], -1) * s), (q, cos, cos), "rope"
    else:  # a sin broadcast over the last dim cannot be sign-split
        fn, args, kind = _rope, (q, cos, cos[..., :1]), "rope"
    gm, done, want = _slim(fn, *args)
    assert done[kind] == 0
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0, equal_nan=True)  # the cube's rsqrt has NaNs


def test_rotate_half_sin_moves_the_negation_exactly():
    g = torch.Generator().manual_seed(2)
    x, sin = torch.randn(3, 5, 8, generator=g), torch.randn(5, 8, generator=g)
    turned = torch.cat([-x[..., 4:], x[..., :4]], -1) * sin
    assert torch.equal(torch.roll(x, 4, -1) * rotate_half_sin(sin, 4), turned)


def test_runner_holds_the_graph_weights_at_the_top_level():
    _, result = decode_graph(STORIES)
    gm = result.graph_module
    runner = TorchBackend(gm).runner
    owned = {id(t) for t in (*gm.parameters(), *gm.buffers())}
    attrs = [n.target for n in runner.graph.nodes if n.op == "get_attr"]
    assert attrs and all("." not in a for a in attrs)
    tensors = [getattr(runner, a) for a in attrs if isinstance(getattr(runner, a), torch.Tensor)]
    assert tensors and all(id(t) in owned for t in tensors)  # shared, not copied
