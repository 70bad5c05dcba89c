"""Tests of the L2A recipe (``condfx.l2a``): training, dense steps, statistics, state round trip."""

from __future__ import annotations

import functools

import pytest
import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
from condfx.l2a import L2ARecipe, l2a_trainable, record_route_stats, route_fractions, train_l2a
from condfx.patterns.routed import find_routed_layers
from condfx.train import load_trained

TASK = MQARConfig(vocab_size=32, num_pairs=2, gap=8, seq_len=16)


@functools.cache
def _captured():
    model = build_mqar_model(TASK, dim=32).eval()
    ids, _ = make_mqar_batch(TASK, 2, torch.Generator().manual_seed(0))
    return model, condfx.capture(model, (ids,)), ids


def _routed(window: int = 4):
    model, gm, ids = _captured()
    return condfx.apply(gm, f"route-attention{{window={window}}}").graph_module, ids


def _data(step, generator):
    return make_mqar_batch(TASK, 8, generator)


def test_train_lowers_routed_fraction_freezes_mlp_and_round_trips(tmp_path):
    gm, ids = _routed()
    params = dict(gm.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    assert route_fractions(gm, ids) == [1.0, 1.0]  # zero-initialised router routes everything
    result = train_l2a(gm, _data, L2ARecipe(steps=12, warmup=1, lam=5.0, lr=3e-3), progress=False,
                       save_to=tmp_path / "l2a.safetensors")
    assert len(result.fractions) == 12 and result.lam == pytest.approx(5.0)
    assert max(route_fractions(gm, ids)) < 1.0
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert any(".l2a.router_weight" in n for n in changed)
    assert any(".l2a.global_wq" in n for n in changed) and any(n.endswith("wq.weight") for n in changed)
    assert not any("feed_forward" in n or "tok_embeddings" in n for n in changed)
    assert changed <= l2a_trainable(gm)
    fresh, _ = _routed()
    load_trained(fresh, tmp_path / "l2a.safetensors")
    torch.testing.assert_close(fresh(ids), gm(ids), atol=0, rtol=0)
    assert not any(bool(x.state.dense) for x in find_routed_layers(gm))  # dense flags reset


def test_dense_step_gives_unrouted_tokens_a_router_gradient():
    gm, ids = _routed()
    layer = find_routed_layers(gm)[0]
    with torch.no_grad():
        layer.state.router_weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    assert 0 < route_fractions(gm, ids)[0] < 1

    def grad_and_out(dense: bool):
        layer.state.dense.fill_(dense)
        gm.zero_grad()
        out = gm(ids)
        out.pow(2).mean().backward()
        return layer.state.router_weight.grad.clone(), out.detach()

    g_sparse, out_sparse = grad_and_out(False)
    g_dense, out_dense = grad_and_out(True)
    layer.state.dense.fill_(False)
    torch.testing.assert_close(out_sparse, out_dense)  # same forward: the gate masks the extras
    assert not torch.allclose(g_sparse, g_dense)


def test_target_fraction_mode_raises_lambda_while_above_target():
    gm, _ = _routed()
    result = train_l2a(gm, _data, L2ARecipe(steps=6, warmup=0, lam=0.1, target_fraction=0.2),
                       progress=False)
    assert result.lam > 0.1  # every layer started fully routed, above the 0.2 target


def test_record_route_stats_fills_buffers():
    gm, ids = _routed()
    with torch.no_grad():
        find_routed_layers(gm)[0].state.router_weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    stats = record_route_stats(gm, [ids, ids])
    layers = find_routed_layers(gm)
    assert stats == {0: layers[0].routed_fraction, 1: 1.0}
    assert float(layers[1].state.route_stats[1]) == 2 * ids.numel()


def test_rejects_sequences_not_longer_than_window():
    gm, _ = _routed(window=8)
    short = MQARConfig(vocab_size=32, num_pairs=2, seq_len=8)
    with pytest.raises(ValueError, match="sequences of 8 tokens are not longer than the L2A window 8"):
        train_l2a(gm, lambda s, g: make_mqar_batch(short, 4, g), L2ARecipe(steps=2, warmup=0), progress=False)


def test_rejects_model_without_l2a_layers():
    _, gm, ids = _captured()
    with pytest.raises(ValueError, match="no L2A layer: apply 'route-attention"):
        route_fractions(gm, ids)


def test_rejects_bad_recipe():
    with pytest.raises(ValueError, match=r"L2ARecipe.target_fraction must be in \(0, 1\)"):
        L2ARecipe(target_fraction=1.5)


def test_distillation_adds_kl_to_the_loss():
    model, _, _ = _captured()
    recipe = L2ARecipe(steps=2, warmup=0, lam=0.0, dense_fraction=0.0, lr=1e-9)
    plain = train_l2a(_routed()[0], _data, recipe, progress=False)
    distilled = train_l2a(_routed()[0], _data, L2ARecipe(**{**recipe.__dict__, "distill": 1.0}),
                          teacher=model, progress=False)
    assert distilled.losses[0] > plain.losses[0]  # KL(original || L2A) > 0 at initialisation
    with pytest.raises(ValueError, match="distill > 0 needs a teacher"):
        train_l2a(_routed()[0], _data, L2ARecipe(**{**recipe.__dict__, "distill": 1.0}), progress=False)


def test_router_warmup_keeps_routers_frozen():
    gm, _ = _routed()
    train_l2a(gm, _data, L2ARecipe(steps=3, warmup=0, router_warmup=3), progress=False)
    layers = find_routed_layers(gm)
    assert all(torch.all(x.state.router_weight == 0) for x in layers)
    assert all(x.state.router_weight.requires_grad for x in layers)  # flags restored
