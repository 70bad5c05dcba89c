"""The L2A retrofit's calibration (``condfx.l2a_retrofit`` behind ``condfx.apply``): oracle labels, the
routers' fit and threshold allocation on stories260K, the oracle router, prune-global on the select
form, the saved state, and bad input (targets, text shorter than the window, another model's state)."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch

import condfx
from condfx.l2a import l2a_view, record_route_stats, route_fractions, window_only
from condfx.l2a_retrofit import (
    OracleRouter,
    allocate,
    calibrate_select,
    copy_rows,
    fit_corrections,
    fit_head,
    forced_routes,
    oracle_labels,
    oracle_routes,
    projection_chain,
    routed_features,
    router_scores,
    select_layers,
    set_forced_routes,
)
from condfx.lifecycle import load_state, save_state
from condfx.passes.base import Budget, Need, calibration_batches
from condfx.patterns.routed import find_routed_layers
from tests._data import require_data
from tests._iha import captured

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 16
SPEC = f"route-attention{{form=select,window={WINDOW},skip=0.6,correct=128,copies=true}}"


@functools.cache
def _ids() -> list[int]:
    from condfx.models_zoo import Llama2cTokenizer

    tok = Llama2cTokenizer.from_file(require_data("tok512.bin"))
    return tok.encode(require_data("tinystories_valid_head.txt").read_text()[:20000], bos=True, eos=False)[:1024]


def _stories():
    """(the shared stories260K capture, a private copy: tests/_iha.py), 1,024 TinyStories ids."""
    return captured("stories260K")[0], _ids()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


@functools.cache
def _calibrated():
    gm, ids = _stories()
    budget = Budget(tokens=512, seq_len=128)
    seen = []
    result = _quiet(condfx.apply, gm, SPEC, calib=calibration_batches(ids, budget), budget=budget,
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    return result, seen


def test_calibration_inside_apply_skips_the_target_in_every_layer():
    _, ids = _stories()
    result, seen = _calibrated()
    record = result.calibrations[0]
    assert record.need is Need.CALIBRATION and record.calibrated and "oracle-taught routers" in record.summary
    assert ("route-attention: window corrections", 4, 4) in seen and ("route-attention: oracle labels", 4, 4) in seen
    assert seen[-1] == ("route-attention: oracle labels (copy rows)", 4, 4)
    assert sorted({k.rsplit(".", 1)[-1] for k in result.state}) == [
        "correct_bias", "correct_down", "correct_up", "router_bias", "router_weight", "threshold"]
    calib = torch.tensor(ids[:512]).reshape(4, 128)
    skipped = [1 - f for f in route_fractions(result.graph_module, calib)]
    assert all(abs(s - 0.6) < 0.02 for s in skipped), skipped  # the calibration text itself
    held_out = torch.tensor(ids[512:1024]).reshape(4, 128)
    assert all(0.4 < 1 - f < 0.8 for f in route_fractions(result.graph_module, held_out))


def test_calibration_without_a_correction_shows_no_correction_stage():
    gm, ids = _stories()
    budget = Budget(tokens=512, seq_len=128)
    seen = []
    result = _quiet(condfx.apply, gm, f"route-attention{{form=select,window={WINDOW},skip=0.6}}",
                    calib=calibration_batches(ids, budget), budget=budget,
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert {stage for stage, _, _ in seen} == {"route-attention: oracle labels"}
    assert sorted({k.rsplit(".", 1)[-1] for k in result.state}) == ["router_bias", "router_weight", "threshold"]


def test_state_round_trips_and_is_refused_for_another_model(tmp_path):
    gm, ids = _stories()
    result, _ = _calibrated()
    path = tmp_path / "calibration.safetensors"
    save_state(result, gm, path)
    x = torch.tensor(ids[:64])[None]
    again = _quiet(load_state, path, gm)
    torch.testing.assert_close(again.graph_module(x), result.graph_module(x), atol=0, rtol=0)
    other = copy.deepcopy(gm)
    with torch.no_grad():
        next(other.parameters()).add_(0.5)  # other weights, same shapes
    with pytest.raises(ValueError, match="was made for a different model .* recalibrate for this model"):
        load_state(path, other)


def test_oracle_router_forced_routes_and_prune_global():
    gm, ids = _stories()
    result, _ = _calibrated()
    sel = result.graph_module
    x = torch.tensor(ids[512:640])[None]
    forced = forced_routes(sel)
    with torch.no_grad():
        set_forced_routes(forced, [torch.ones(1, 128, dtype=torch.bool)] * 5)
        torch.testing.assert_close(forced(x), gm(x), atol=1e-5, rtol=1e-5)  # all routed: the original
        routes = oracle_routes(sel, x)
        assert all(0.3 < 1 - float(r.float().mean()) < 0.9 for r in routes)
        assert not routes[0][0, :WINDOW].any()  # a token inside the window costs nothing
        oracle = OracleRouter(sel, forced)  # the same decisions, as a model
        out = oracle(x)
        assert oracle.fractions == [float(r.double().mean()) for r in routes]
        set_forced_routes(forced, routes)
        torch.testing.assert_close(out, forced(x), atol=0, rtol=0)
        assert (out - gm(x)).abs().max() > 1e-3
        # at an exact skip: each layer skips its cheapest half of the tokens past the window
        costs = oracle_labels(sel, [x]).costs
        for r, c in zip(oracle_routes(sel, x, skip=0.5), costs, strict=True):
            assert r[0, :WINDOW].all() and int((~r[0, WINDOW:]).sum()) == (128 - WINDOW) // 2
            assert float(c[WINDOW:][~r[0, WINDOW:]].max()) <= float(c[WINDOW:][r[0, WINDOW:]].min())
        with pytest.raises(ValueError, match="skip must be in"):
            OracleRouter(sel, forced, skip=1.5)
        record_route_stats(sel, [x])
        pruned = condfx.apply(sel, "prune-global{max_fraction=1.0}").graph_module
        assert not find_routed_layers(pruned)
        never = copy.deepcopy(sel)  # no token routes: the window branch (with its sink tokens) alone
        for r in find_routed_layers(never):
            r.state.threshold.fill_(float("inf"))
        torch.testing.assert_close(pruned(x), never(x), atol=1e-5, rtol=1e-5)
        assert (pruned(x) - window_only(gm, WINDOW)(x)).abs().max() > 1e-3  # the sinks are read


def test_oracle_cost_is_zero_inside_the_window_and_labels_leave_thresholds():
    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    labels = oracle_labels(sel, [torch.tensor(ids[:64])[None]])
    assert all(float(c[:WINDOW].max()) < 1e-5 and float(c[WINDOW:].mean()) > 1e-2 for c in labels.costs)
    assert all(torch.isinf(r.state.threshold) for r in find_routed_layers(sel))


def test_oracle_cost_is_the_change_of_what_the_layer_adds_to_the_stream():
    """The cost is || (full - window) W_o^T || per token: the output projection is found in the graph
    (the reshapes after the select, then the linear) and replayed on both branches."""
    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    layers = select_layers(sel)
    chains = [projection_chain(r.nodes["out"]) for r in layers]
    assert all(c is not None and c[-1].target is torch.ops.aten.linear.default for c in chains)
    x = torch.tensor(ids[:64])[None]
    labels = oracle_labels(sel, [x])
    with torch.no_grad():
        out = l2a_view(sel, "routed", "window")(x)
    n = len(layers)
    for j, chain in enumerate(chains):
        wo = sel.get_parameter(chain[-1].args[1].target)
        full, win = out[1 + j], out[1 + n + j]
        by_hand = ((full - win)[0].transpose(0, 1).reshape(64, -1) @ wo.T).norm(dim=-1)
        torch.testing.assert_close(labels.costs[j], by_hand, atol=1e-6, rtol=1e-4)
        assert float(by_hand[WINDOW:].min()) > 0.0


def test_window_corrections_lower_the_cost_of_skipping_on_held_out_text():
    """fit_corrections on 4,096 TinyStories tokens: the oracle cost of skipping (the change of what
    the layer adds to the stream) falls on text it did not see; the cross-fitted labels of the
    calibration rows are those of corrections fitted without each row, so they sit above the in-sample
    ones; a correction that does not help on held-out folds is left at zero."""
    from condfx.models_zoo import Llama2cTokenizer

    gm, _ = _stories()
    tok = Llama2cTokenizer.from_file(require_data("tok512.bin"))
    ids = tok.encode(require_data("tinystories_valid_head.txt").read_text()[:80000], bos=True, eos=False)
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},correct=128}}").graph_module
    rows, held = [torch.tensor(ids[:4096]).reshape(16, 256)], [torch.tensor(ids[4096:5120]).reshape(4, 256)]
    before = oracle_labels(sel, held)
    fitted = fit_corrections(sel, rows)
    after = oracle_labels(sel, held)
    assert fitted.folds == 2 and len(fitted.layers) == 5 and len(fitted.held_out) == 2
    past = before.positions >= WINDOW + 4
    ratios = [float(a[past].mean() / b[past].mean()) for a, b in zip(after.costs, before.costs, strict=True)]
    assert sum(ratios) / len(ratios) < 0.95 and min(ratios) < 0.85, ratios
    final = [r.state.correct_up.detach().clone() for r in select_layers(sel)]
    crossed, insample = oracle_labels(sel, rows, corrections=fitted), oracle_labels(sel, rows)
    assert sum(float(c.mean()) for c in crossed.costs) > sum(float(c.mean()) for c in insample.costs)
    assert all(torch.equal(f, r.state.correct_up) for f, r in zip(final, select_layers(sel), strict=True))
    tiny = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},correct=128}}").graph_module
    fit_corrections(tiny, [torch.tensor(ids[:96]).reshape(2, 48)])  # 28 tokens per fold, 128 features
    assert any(float(r.state.correct_up.abs().max()) == 0.0 for r in select_layers(tiny))


def test_copy_rows_teach_the_heads_and_set_no_threshold():
    """Rows that repeat their first half (copy_rows) are labelled and fitted by the heads, while the
    thresholds still skip the target on the calibration rows themselves; the oracle marks the copied
    half's tokens costlier than the same tokens the first time."""
    gm, ids = _stories()
    rows = [torch.tensor(ids[:512]).reshape(4, 128)]
    copies = copy_rows(rows, WINDOW)
    assert [c.shape for c in copies] == [(4, 128)] and torch.equal(copies[0][:, 64:], rows[0][:, :64])
    assert copy_rows(rows, 64) == []  # a copy 64 tokens back would still be inside a 64-token window
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW},correct=128}}").graph_module
    labels = oracle_labels(sel, rows, corrections=fit_corrections(sel, rows))
    teach = oracle_labels(sel, copies)
    second = teach.positions >= 64 + WINDOW
    first = (teach.positions >= WINDOW) & (teach.positions < 64)
    assert sum(float(c[second].mean() / c[first].mean()) for c in teach.costs) / len(teach.costs) > 1.2
    plain = copy.deepcopy(sel)
    calibrate_select(plain, rows, skip=0.6, labels=labels)
    cal = calibrate_select(sel, rows, skip=0.6, labels=labels, teach=teach)
    assert all(abs(s - 0.6) < 0.02 for s in cal.skip), cal.skip
    assert not torch.equal(select_layers(plain)[1].state.router_weight, select_layers(sel)[1].state.router_weight)


def test_allocate_spends_extra_skips_where_cheap_above_the_floor():
    cheap, dear = torch.arange(100.0), torch.arange(100.0) + 1000.0
    thr = allocate([cheap, dear], skip=0.7, floor=0.5)
    skips = [int((s < t).sum()) for s, t in zip((cheap, dear), thr, strict=True)]
    assert skips == [90, 50]
    assert allocate([cheap, dear], skip=0.6, floor=0.6) == [60.0, 1060.0]
    # tied scores skip or route together, on the side nearer the target count (skipping when as near)
    even, uneven = torch.tensor([0.0, 1, 1, 1, 1, 2]), torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 2])
    assert allocate([even], skip=0.5, floor=0.5) == [2.0]  # 3 wanted: 1 or 5 skip, 5 chosen
    assert allocate([uneven], skip=0.5, floor=0.25) == [1.0]  # 4 wanted: 2 or 7 skip, 2 chosen (floor 2)
    # ... but never below the floor: with 4 promised, the tie group skips whole
    assert allocate([uneven], skip=0.5, floor=0.5) == [2.0]
    assert allocate([torch.tensor([0.0, 1, 1, 1, 1, 1])], skip=0.5, floor=0.5) == [math.inf]


def test_head_ridge_is_chosen_on_held_out_rows_by_the_cost_of_its_skips():
    """Few tokens and many noisy features: a strong ridge spends less true cost on held-out rows and
    is chosen; many tokens and a clean linear cost: the weakest."""
    from condfx.l2a_retrofit import _choose_head_ridge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 60, generator=g)
    y = x[:, 0] + 0.5 * torch.randn(80, generator=g)
    rows = torch.arange(80) // 20  # four rows of 20 tokens
    assert _choose_head_ridge(x, y, rows, skip=0.5) >= 1.0
    x = torch.randn(4000, 6, generator=g)
    y = x @ torch.arange(1.0, 7.0)
    assert _choose_head_ridge(x, y, torch.arange(4000) // 1000, skip=0.5) == 1e-3
    assert _choose_head_ridge(x, y, torch.zeros(4000, dtype=torch.long), skip=0.5) == 1e-3  # one row: no choice


def test_bad_input_targets_short_text_and_rows():
    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    rows = [torch.tensor(ids[:64])[None]]
    with pytest.raises(ValueError, match=r"skip target must be in \(0, 1\)"):
        calibrate_select(sel, rows, skip=1.5)
    with pytest.raises(ValueError, match="sequences longer than its window 16; the calibration batches hold 16"):
        calibrate_select(sel, [torch.tensor(ids[:16])[None]], skip=0.5)
    with pytest.raises(ValueError, match="the calibration text gives 16 tokens; route-attention needs at least 17"):
        condfx.apply(gm, SPEC, calib=[torch.tensor(ids[:16])[None]], budget=Budget(tokens=16, seq_len=16))
    with pytest.raises(ValueError, match=r"no route-attention\{form=select\} layer"):
        calibrate_select(gm, rows, skip=0.5)


def test_closed_loop_rounds_allocate_on_the_scores_the_routers_see():
    """The thresholds of rounds > 0 are quantiles of the calibrated graph's own (closed-loop) scores:
    ``router_scores`` agrees with the routes the graph takes, and the calibration text skips the
    floor in every layer to within one token."""
    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    rows = [torch.tensor(ids[i : i + 128])[None] for i in range(0, 512, 128)]
    labels = oracle_labels(sel, rows)
    calibrate_select(sel, rows, skip=0.6, labels=labels, rounds=0, refits=0)
    open_loop = router_scores(sel, rows)
    calibrate_select(sel, rows, skip=0.6, labels=labels, rounds=1, refits=0)
    scores = router_scores(sel, rows)
    assert any(not torch.equal(a, b) for a, b in zip(open_loop, scores, strict=True))  # the stream moved
    routed = route_fractions(sel, torch.cat(rows))
    for layer, s, fr in zip(find_routed_layers(sel), scores, routed, strict=True):
        assert abs(float((s < float(layer.state.threshold)).double().mean()) - (1 - fr)) < 1e-9
    # the first layer's scores do not depend on the routing: its threshold is the allocation on them
    first = find_routed_layers(sel)[0]
    assert float(first.state.threshold) == allocate(scores, 0.6, 0.6)[0]
    assert abs((1 - routed[0]) - 0.6) < 0.02  # ties (tokens of one id share a first-layer score) aside


def test_refit_fits_the_heads_on_the_stream_the_calibrated_graph_reads():
    """A refit pools the open-loop features with the calibrated graph's own (closed-loop) x_in and
    fits every head again to the same oracle labels: the heads are the ridge fit on that pool."""
    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    rows = [torch.tensor(ids[i : i + 128])[None] for i in range(0, 512, 128)]
    labels = oracle_labels(sel, rows)
    calibrate_select(sel, rows, skip=0.6, labels=labels, rounds=1, refits=0)
    closed = routed_features(sel, rows)  # what the refit reads: the graph as the first fit routes it
    assert any(not torch.equal(a, b) for a, b in zip(labels.features, closed, strict=True))
    cal = calibrate_select(sel, rows, skip=0.6, labels=labels, rounds=1, refits=1)
    past = labels.positions >= WINDOW
    for layer, x_open, x_closed, cost, ridge in zip(select_layers(sel), labels.features, closed, labels.costs,
                                                    cal.ridges, strict=True):
        y = cost.double()[past]
        w, b = fit_head(torch.cat([x_open[past], x_closed[past]]), y.repeat(2), ridge)
        torch.testing.assert_close(layer.state.router_weight[0].double(), w, rtol=1e-4, atol=1e-5)
        assert abs(float(layer.state.router_bias) - b) < 1e-4
    assert all(abs(s - 0.6) < 0.02 for s in cal.skip)  # the rounds after the refit hold the target
    with pytest.raises(ValueError, match="rounds, refits and recall must be >= 0"):
        calibrate_select(sel, rows, skip=0.6, labels=labels, refits=-1)


def test_recall_cost_is_the_first_order_change_of_the_far_context_tokens_loss():
    """recall_costs = | dJ/d full . (full - window) | per layer and token, J the log-likelihood of the
    tokens weighted by how much skipping everywhere raises their loss: checked against the gradient
    of J through the original fused graph (another autograd path: no select, no window op)."""
    from condfx.l2a_retrofit import recall_costs
    from condfx.passes._insert import output_view

    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    layers = select_layers(sel)
    x = torch.tensor(ids[:64])[None]
    costs = recall_costs(sel, [x])
    assert all(torch.isinf(r.state.threshold) and r.state.threshold < 0 for r in layers)
    assert all(p.grad is None for p in sel.parameters())

    with torch.no_grad():
        for r in layers:
            r.state.threshold.fill_(float("inf"))
        skipped = sel(x)
        skipped = skipped[0] if isinstance(skipped, (tuple, list)) else skipped
        for r in layers:
            r.state.threshold.fill_(float("-inf"))
        _, *branches = l2a_view(sel, "routed", "window")(x)
    fused = condfx.apply(gm, "fuse-attention").graph_module
    cores = [n for n in fused.graph.nodes if n.target is torch.ops.condfx.attention.default]
    assert len(cores) == len(layers)

    def outputs(graph, output):
        logits = output.args[0]
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        names = {n.name for n in cores}
        return (logits, *(n for n in graph.nodes if n.name in names))

    logits, *fulls = output_view(fused, outputs)(x)
    logp = logits[0, :-1].float().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
    nll = torch.nn.functional.cross_entropy(skipped[0, :-1].float(), x[0, 1:], reduction="none")
    weight = (nll + logp.detach()).clamp(min=0)
    assert float(weight.sum()) > 0
    grads = torch.autograd.grad((weight * logp).sum(), fulls, retain_graph=True)
    blind = weight.clone()
    blind[39:] = 0.0  # the predictions of tokens 40 on left out (an answer the labels must not see)
    blind_grads = torch.autograd.grad((blind * logp).sum(), fulls)
    until = oracle_labels(sel, [x], recall=True, scored_until=40).recall
    n = len(layers)
    for j in range(n):
        delta = branches[j] - branches[n + j]
        by_hand = (grads[j] * delta).sum((1, 3))[0].abs()
        torch.testing.assert_close(costs[j], by_hand, atol=1e-6, rtol=1e-3)
        assert float(costs[j][:WINDOW].max()) < 1e-5 < float(costs[j][WINDOW:].max())
        torch.testing.assert_close(until[j], (blind_grads[j] * delta).sum((1, 3))[0].abs(), atol=1e-6, rtol=1e-3)
        assert float(until[j][40:].max()) == 0.0  # nothing after 40 is scored, so nothing there matters


def test_recall_weight_mixes_the_recall_cost_into_the_labels_and_the_oracle():
    from condfx.l2a_retrofit import oracle_costs

    gm, ids = _stories()
    sel = condfx.apply(gm, f"route-attention{{form=select,window={WINDOW}}}").graph_module
    rows = [torch.tensor(ids[i * 128 : (i + 1) * 128])[None] for i in range(4)]
    plain = oracle_labels(sel, rows)
    with pytest.raises(ValueError, match="recall costs"):
        calibrate_select(sel, rows, skip=0.5, labels=plain, recall=1.0)
    with pytest.raises(ValueError, match="recall=-1"):
        calibrate_select(sel, rows, skip=0.5, labels=plain, recall=-1.0)
    labels = oracle_labels(sel, rows, recall=True)
    for a, b in zip(labels.costs, plain.costs, strict=True):
        torch.testing.assert_close(a, b)
    cal = calibrate_select(sel, rows, skip=0.5, labels=labels, recall=2.0, rounds=0, refits=0)
    past = labels.positions >= WINDOW
    mixed = oracle_costs(sel, labels)
    for r, c, rc, m in zip(select_layers(sel), labels.costs, labels.recall, mixed, strict=True):
        weight = 2.0 * float(c[past].double().mean()) / float(rc[past].double().mean())
        assert float(r.state.recall_weight) == pytest.approx(weight, rel=1e-6)
        torch.testing.assert_close(m, c.double() + weight * rc.double())
    assert all(abs(s - 0.5) < 0.02 for s in cal.oracle_skip)
    # the oracle router ranks a text by the mixed cost: other decisions than by the cost alone
    x = rows[0]
    routes = oracle_routes(sel, x)
    by_cost = [torch.log(c[:128].double() + 1e-4) >= float(r.state.oracle_threshold)
               for r, c in zip(select_layers(sel), plain.costs, strict=True)]
    assert any(not torch.equal(a[0], b) for a, b in zip(routes, by_cost, strict=True))
    with pytest.raises(ValueError, match="recall=True"):
        oracle_costs(sel, plain)
