"""``route-attention{form=select}`` (the L2A retrofit form): exact at insertion on stories260K, the
where(route, global, window) decision, decode through the torch and ONNX Runtime sessions, options."""

from __future__ import annotations

import functools

import pytest
import torch

import condfx
from condfx.l2a import route_fractions, window_only
from condfx.passes.route_attention import RouteAttentionConfig
from condfx.patterns.routed import find_routed_layers
from condfx.runtime.session import Session, TorchBackend
from tests._iha import captured

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 4


def _ids(t: int = 24, b: int = 2) -> torch.Tensor:
    return torch.randint(3, 500, (b, t), generator=torch.Generator().manual_seed(1))


@functools.cache
def _select(sink: int | None = 0):
    gm, _ = captured("stories260K")
    extra = "" if sink is None else f",sink={sink}"
    return gm, condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},correct=128{extra}}}").graph_module


def _routed_half(gm, correct: float = 0.0):
    """A copy of ``gm`` whose routers send about half the tokens to global attention (and whose window
    corrections are random with scale ``correct``)."""
    import copy

    out = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for r in find_routed_layers(out):
            r.state.router_weight.normal_(0, 1.0, generator=g)
            r.state.threshold.fill_(0.0)
            if correct:
                for name in ("correct_down", "correct_up", "correct_bias"):
                    getattr(r.state, name).normal_(0, correct, generator=g)
    return out


def test_numerics_exact_at_insertion():
    gm, sel = _select()
    ids = _ids(40)
    with torch.no_grad():
        assert (gm(ids) - sel(ids)).abs().max().item() <= 1e-5
    layers = find_routed_layers(sel)
    assert [r.layer for r in layers] == [0, 1, 2, 3, 4]
    assert all(set(r.nodes) == {"route", "routed", "window", "features", "corrected", "out", "input"} for r in layers)
    assert all(int(op.args[4]) == WINDOW for op in (r.nodes["window"] for r in layers))


def test_numerics_sink_tokens_in_the_window_branch():
    """sink=N: unrouted rows read the first N tokens too (default 4); with N >= T the window
    branch sees everything, so a model where no token routes is the original again."""
    from condfx.passes.op_args import op_arg

    gm, _ = _select()
    ids = _ids(30)
    every = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},sink=30}}").graph_module
    _, default = _select(None)
    layers = find_routed_layers(default)
    assert all(op_arg(r.nodes["window"], "sink") == 4 for r in layers)
    with torch.no_grad():
        for model in (every, default):
            for r in find_routed_layers(model):
                r.state.threshold.fill_(float("inf"))  # no token routes
        torch.testing.assert_close(every(ids), gm(ids), atol=1e-5, rtol=1e-5)
        sinks, window = default(ids), window_only(gm, WINDOW)(ids)
    assert (sinks - gm(ids)).abs().max() > 1e-3 and (sinks - window).abs().max() > 1e-3


def test_numerics_unrouted_rows_are_window_attention_and_routed_rows_full():
    gm, sel = _select()
    half = _routed_half(sel)
    window = window_only(gm, WINDOW)
    ids = _ids(30)
    with torch.no_grad():
        for r in find_routed_layers(half):
            r.state.threshold.fill_(float("inf"))  # no token routes: the window-only model
        torch.testing.assert_close(half(ids), window(ids), atol=1e-5, rtol=1e-5)
        for r in find_routed_layers(half):
            r.state.threshold.fill_(0.0)
        mixed = half(ids)
    assert (mixed - gm(ids)).abs().max() > 1e-3 and (mixed - window(ids)).abs().max() > 1e-3
    fractions = route_fractions(half, ids)
    assert all(0.0 < f < 1.0 for f in fractions), fractions


def test_numerics_window_correction_only_where_keys_fall_outside_the_window():
    """A random correction changes the tokens that skip, from position window + sink on; before it the
    window branch is already the full attention and the model stays the original."""
    gm, sel = _select(None)
    noisy = _routed_half(sel, correct=0.1)
    plain = _routed_half(sel)
    ids = _ids(30)
    with torch.no_grad():
        for model in (noisy, plain):
            for r in find_routed_layers(model):
                r.state.threshold.fill_(float("inf"))  # no token routes
        first = WINDOW + 4  # window + the default 4 sinks
        torch.testing.assert_close(noisy(ids)[:, :first], gm(ids)[:, :first], atol=1e-5, rtol=1e-5)
        assert (noisy(ids)[:, first:] - plain(ids)[:, first:]).abs().amax(-1).min() > 1e-3
    layers = find_routed_layers(noisy)
    assert all(int(r.state.correct_from) == first and r.state.correct_down.shape[0] == 64 for r in layers)
    bare = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module  # the default: none
    assert all("corrected" not in r.nodes and not hasattr(r.state, "correct_up") for r in find_routed_layers(bare))


def test_numerics_router_reads_the_window_output():
    """router=window reads x_in and the layer's window output: in layer 0, whose x_in is
    the token embedding alone, the same token scores differently where its windows differ; the input
    router scores it the same everywhere."""
    from condfx.l2a_retrofit import router_scores

    gm, _ = _select()
    ids = _ids(30, 1)
    ids[0, ::3] = 7  # one token, ten positions, ten different windows
    scores = {}
    for router in ("input", "window"):
        sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},router={router}}}").graph_module
        r = find_routed_layers(sel)[0]
        width = r.state.router_weight.shape[-1]
        with torch.no_grad():
            r.state.router_weight.normal_(generator=torch.Generator().manual_seed(0))
            assert (gm(ids) - sel(ids)).abs().max() <= 1e-5  # still exact: every token routes
        scores[router] = router_scores(sel, [ids])[0][::3]
        if router == "window":
            x_in = find_routed_layers(condfx.apply(gm, f"route-attention{{form=select,router=input,window={WINDOW}}}")
                                      .graph_module)[0].state.router_weight.shape[-1]
            assert width > x_in  # x_in and the heads x head dim of the window output
    assert torch.allclose(scores["input"], scores["input"][0].expand(10))
    assert (scores["window"] - scores["window"][0]).abs().max() > 1e-3


@pytest.mark.slow  # about 170 s each on the shared 2-core machine: add-kv-cache's re-export and the ONNX export
@pytest.mark.parametrize("router", ["input", "window"])
def test_decode_torch_and_onnx_sessions_match_full_forward(router):
    pytest.importorskip("onnxruntime")
    from condfx.runtime.onnx_backend import OnnxBackend

    gm, _ = _select(None)
    # the default: the window branch keeps 4 sink tokens; a rank-128 correction; the router reading x_in
    # (router=input) or x_in and the window output, which decode must give it as the full forward does
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},correct=128,router={router}}}").graph_module
    half = _routed_half(sel, correct=0.1)  # decode must offset the correction's positions as RoPE's
    decode = condfx.apply(half, "add-kv-cache").graph_module
    ids = _ids(16, 1)
    with torch.no_grad():
        full = half(ids)
    for backend in (TorchBackend(decode), OnnxBackend.from_graph(decode)):
        session = Session(backend)
        logits = [session.prefill(ids[:, :9])[:, -1]]
        logits += [session.step(ids[:, i : i + 1])[:, -1] for i in range(9, 16)]
        got = torch.as_tensor(torch.stack(logits[:-1], 1))
        torch.testing.assert_close(got, full[:, 8:15], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"form": "select", "skip": 1.0}, r"skip must be None or a number in \(0, 1\)"),
        ({"form": "select", "skip": 0.0}, r"skip must be None or a number > 0"),
        ({"form": "add", "skip": 0.5}, "read by form=select only"),
        ({"form": "add", "sink": 4}, "read by form=select only"),
        ({"form": "add", "correct": 8}, "read by form=select only"),
        ({"form": "add", "copies": True}, "read by form=select only"),
        ({"form": "select", "copies": 1}, "copies must be None or a bool"),
        ({"form": "add", "router": "window"}, "read by form=select only"),
        ({"form": "select", "router": "keys"}, r"router must be None or one of \{input, window\}"),
        ({"form": "select", "correct": -1}, "correct must be None or an int >= 0"),
        ({"form": "select", "sink": -1}, "sink must be None or an int >= 0"),
        ({"form": "select", "skip": 0.5, "floor": 0.6}, "floor=0.6 must be at most skip=0.5"),
        ({"form": "other"}, "form must be one of {add, select}"),
    ],
)
def test_bad_input_select_options(options, match):
    with pytest.raises(ValueError, match=match):
        RouteAttentionConfig(**options)
