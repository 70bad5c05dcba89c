"""``route-attention`` on the layer forms people bring (issue 15): post / sandwich norms (Gemma-3,
OLMo-2: no input norm either), a residual multiplier (Granite), softcapped scores (Gemma-2), ALiBi
(Bloom) and parallel attention + MLP blocks (GPT-NeoX). Tiny transformers configs, float32.

At initialisation every token is routed and the global branch copies the base weights, so an L2A layer
is the layer's attention sublayer applied twice. The reference builds that from the HF model itself:
every decoder layer is preceded by a copy of it whose MLP output is zero (x + post(mlp) * c = x).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import condfx
from condfx.models_zoo.hf import CausalLMLogits
from condfx.passes.route_attention import ROUTED
from condfx.patterns.routed import find_routed_layers
from condfx.runtime.session import Session
from tests._helpers import TOLERANCES

pytestmark = pytest.mark.usefixtures("one_thread")

T = 10
_SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    configs = {
        "gemma3": lambda: tf.Gemma3TextConfig(**_SMALL, head_dim=16, sliding_window=16,
                                              layer_types=["sliding_attention", "full_attention"]),
        "olmo2": lambda: tf.Olmo2Config(**_SMALL),
        "granite": lambda: tf.GraniteConfig(**_SMALL, residual_multiplier=0.5),
        "gemma2": lambda: tf.Gemma2Config(**_SMALL, head_dim=16, attn_logit_softcapping=5.0, sliding_window=16),
        "bloom": lambda: tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=96,
                                             use_parallel_residual=True, max_position_embeddings=64),
    }
    config = configs[kind]()
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    return model


def _ids(b: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (b, T), generator=torch.Generator().manual_seed(0))


def _attention_twice(hf: nn.Module) -> nn.Module:
    """A copy of ``hf`` in which every decoder layer runs once with its MLP output zeroed, then as is."""
    twice = copy.deepcopy(hf)
    body = twice.model
    layers = []
    for layer in body.layers:
        attn_only = copy.deepcopy(layer)
        nn.init.zeros_(attn_only.mlp.down_proj.weight)
        layers += [attn_only, layer]
    body.layers = nn.ModuleList(layers)
    twice.config.num_hidden_layers = len(layers)
    if getattr(twice.config, "layer_types", None) is not None:
        twice.config.layer_types = [t for t in twice.config.layer_types for _ in (0, 1)]
    return twice


@functools.cache
def _captured(kind: str):
    model = CausalLMLogits(_hf(kind), kind)
    return model, condfx.capture(model, (_ids(),))


def _route(kind: str):
    model, gm = _captured(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(gm)
    result = condfx.apply(gm, f"route-attention{{window={T}}}")
    return model, result.reports[0], result.graph_module


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("kind", [pytest.param("gemma3", marks=pytest.mark.slow), "olmo2", "granite"])
def test_numerics_initial_model_runs_attention_twice(kind):
    """Post-norm (applied to the global output too), no input norm and the residual multiplier."""
    model, report, routed = _route(kind)
    assert report.rewritten == 2 and report.skipped == ()
    with torch.no_grad():
        want = _attention_twice(model.hf)(input_ids=_ids(), use_cache=False).logits
        got = _logits(routed(_ids()))
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert (got - model(_ids())).abs().max() > 1e-3  # the global branch really runs


@pytest.mark.parametrize(("kind", "option"), [("gemma2", "softcap"), ("bloom", "alibi_slopes")])
def test_matches_score_options_on_both_attention_ops(kind, option):
    _, report, routed = _route(kind)
    assert report.rewritten == 2
    nodes = [n for n in routed.graph.nodes if n.target is ROUTED]
    assert len(nodes) == 2 and all(n.kwargs.get(option) for n in nodes)
    windows = [n for n in routed.graph.nodes if n.target is torch.ops.condfx.attention.default]
    assert all(n.args[5 if option == "softcap" else 6] for n in windows)  # the window branch keeps it


def test_matches_parallel_block_adds_the_global_output_to_the_attention_branch():
    """GPT-NeoX ``x + attn(ln1(x)) + mlp(ln2(x))``: the router reads x + attn, the MLP still reads x."""
    model, report, routed = _route("gpt_neox")
    assert report.rewritten == 2
    for layer in find_routed_layers(routed):
        layer.state.global_dense_weight.data.zero_()
        layer.state.global_dense_bias.data.zero_()
    with torch.no_grad():  # window = T: the window branch is the base attention
        torch.testing.assert_close(_logits(routed(_ids())), model(_ids()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [pytest.param("gemma3", marks=pytest.mark.slow),
                                  pytest.param("gemma2", marks=pytest.mark.slow), "gpt_neox"])
def test_numerics_decode_matches_full_forward(kind):
    """add-kv-cache + the torch Session give the routed model's own logits, token by token."""
    _, _, routed = _route(kind)
    with torch.no_grad():
        for layer in find_routed_layers(routed):  # a router that routes some tokens and not others
            layer.state.router_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(layer.layer))
        ids = _ids()[:1]
        full = _logits(routed(_ids()))[:1]
        session = Session.from_graph(condfx.apply(routed, "add-kv-cache").graph_module)
        logits = [session.prefill(ids[:, :5])[:, -1]]
        logits += [session.step(ids[:, i : i + 1])[:, -1] for i in range(5, T)]
    torch.testing.assert_close(torch.stack(logits[:-1], 1), full[:, 4 : T - 1], atol=1e-5, rtol=1e-5)
