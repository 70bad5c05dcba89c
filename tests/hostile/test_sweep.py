"""A seeded random-config sweep: small zoo models of varied shapes × random pass pipelines.

Each case draws a model config (heads, KV heads, head width, layers, FFN width, vocabulary, RoPE
base, norm epsilon, QK-norm, q/k/v biases, tied embeddings, SDPA or eager; a GPT-2 now and then)
(and, under ``-m slow``, a few transformers classes) and a pipeline of 1 to 3 passes from the registry (``PASSES``) with small options, sometimes ending
in ``add-kv-cache``. It asserts that

- a pipeline either runs or fails with a ``ValueError`` / ``PassError`` whose first line names one
  of its passes or options (nothing else escapes: no IndexError, no RuntimeError from torch);
- an exact pipeline (``EXACT``) keeps the logits within ``EXACT_TOL`` of the original model;
- neither the caller's model nor the captured graph it was given is modified, pass or fail.

``CI_CASES`` run by default; ``pytest -m slow tests/hostile/test_sweep.py`` runs ``SLOW_CASES`` more.
Models are captured once per config and shared by that config's pipelines.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

import pytest
import torch

import condfx
from condfx.models_zoo.gpt2 import GPT2Config, GPT2Model
from condfx.models_zoo.llama import LlamaConfig, LlamaModel
from condfx.passes.base import PassError
from condfx.passes.registry import PASSES

pytestmark = pytest.mark.usefixtures("one_thread")

CI_CONFIGS, SLOW_CONFIGS, PIPELINES_PER_CONFIG = 6, 40, 4
# Slow only: transformers classes at conformance sizes (benchmarks/conformance.py build_small);
# config indices from _HF_BASE on name them.
HF_TYPES = ("qwen2", "gemma", "phi3", "olmo2", "mistral")
_HF_BASE = 100
EXACT_TOL = 1e-4
_IHA_EXACT = "interleave-heads{causal=token,positions=token,init_noise=0}"
# Small options per pass (windows shorter than the test sequences, so the lossy passes act).
VARIANTS = {
    "fuse-attention": ("fuse-attention",),
    "interleave-heads": (_IHA_EXACT, "interleave-heads{P=2,init_noise=0.1}"),
    "fold-interleave": ("fold-interleave",),
    "quantize-kv": (
        "quantize-kv{method=kivi,bits=2,group=4,residual=2}",
        "quantize-kv{method=xquant,bits=4,group=4,residual=2}",
        "quantize-kv{method=xquant-cl,bits=3,residual=1}",
    ),
    "route-attention": ("route-attention{window=4}",),
    "skip-ffn": ("skip-ffn{threshold=0.1,cold_start=0,cold_end=0}",),
    "sink-window": ("sink-window{sink=1,window=3}",),
    "prune-global": ("prune-global",),
}
# The order passes usually run in; most pipelines keep it (the others test refusals).
_ORDER = ("fuse-attention", "interleave-heads", "fold-interleave", "route-attention", "prune-global",
          "skip-ffn", "sink-window", "quantize-kv")
# Specs that keep a model's function (the passes' docstrings): exact pipelines use only these.
EXACT = frozenset({"fuse-attention", _IHA_EXACT, "fold-interleave"})
_SEQ = 12


@dataclass(frozen=True)
class Case:
    """One sweep case: a config index (the model) and a pipeline drawn for it."""

    config: int  # the seed of the model config; configs from CI_CONFIGS on are the slow ones
    pipeline: str
    exact: bool

    def __str__(self) -> str:
        hf = self.config >= _HF_BASE
        return f"{HF_TYPES[self.config - _HF_BASE] if hf else f'cfg{self.config}'}-{self.pipeline}"


def _model_config(index: int, slow: bool) -> LlamaConfig | GPT2Config:
    rng = random.Random(1000 + index)
    heads = rng.choice([1, 2, 4, 8])
    head_dim = rng.choice([8, 16])
    common = dict(
        vocab_size=rng.choice([32, 64, 96]), dim=heads * head_dim, n_layers=rng.choice([1, 2, 3] if slow else [1, 2]),
        n_heads=heads, hidden_dim=rng.choice([16, 40, 96]), norm_eps=rng.choice([1e-6, 1e-5, 1e-3]),
        attn_impl=rng.choice(["sdpa", "eager"]),
    )
    if rng.random() < 0.15:
        return GPT2Config(**common)
    return LlamaConfig(
        **common, n_kv_heads=rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0]),
        rope_theta=rng.choice([100.0, 10000.0, 500000.0]), qk_norm=rng.random() < 0.3,
        qkv_bias=rng.random() < 0.3, tie_embeddings=rng.random() < 0.3,
    )


def _pipelines(index: int, n: int, slow: bool) -> list[Case]:
    """``n`` distinct pipelines for config ``index`` (40% drawn from the exact specs only, 75% in
    the usual pass order)."""
    rng = random.Random(2000 + index)
    cases: dict[str, Case] = {}
    for _ in range(20 * n):
        exact = rng.random() < 0.4
        pool = [s for name in sorted(VARIANTS) for s in VARIANTS[name] if not exact or s in EXACT]
        specs = rng.sample(pool, min(len(pool), rng.choice([1, 1, 2, 3])))
        if rng.random() < 0.75:
            specs.sort(key=lambda spec: _ORDER.index(re.split(r"[{,]", spec)[0]))
        if slow and rng.random() < 0.25:  # add-kv-cache re-exports the graph: seconds a case
            specs.append("add-kv-cache")
        pipeline = ",".join(specs)
        cases.setdefault(pipeline, Case(index, pipeline, all(s in EXACT for s in specs)))
        if len(cases) == n:
            break
    return list(cases.values())


def _cases(configs: range, slow: bool) -> list[Case]:
    return [case for i in configs for case in _pipelines(i, PIPELINES_PER_CONFIG, slow)]


CI_CASES = _cases(range(CI_CONFIGS), slow=False)
SLOW_CASES = _cases(range(CI_CONFIGS, CI_CONFIGS + SLOW_CONFIGS), slow=True) + _cases(
    range(_HF_BASE, _HF_BASE + len(HF_TYPES)), slow=True
)


def _build(index: int) -> tuple[torch.nn.Module, int]:
    """The model of config ``index`` (eval mode, seeded) and its vocabulary size."""
    if index >= _HF_BASE:
        from benchmarks.conformance import SMALL, build_small

        return build_small(HF_TYPES[index - _HF_BASE], "sdpa", seed=index), SMALL["vocab_size"]
    cfg = _model_config(index, slow=index >= CI_CONFIGS)
    model = (GPT2Model if isinstance(cfg, GPT2Config) else LlamaModel)(cfg, seed=index)
    return model.eval(), cfg.vocab_size


@functools.lru_cache(maxsize=2)
def _captured(index: int):
    """(model, its captured graph, example ids, reference logits) of config ``index``."""
    model, vocab = _build(index)
    ids = torch.randint(0, vocab, (2, _SEQ), generator=torch.Generator().manual_seed(index))
    gm = condfx.capture(model, (ids,))
    with torch.no_grad():
        reference = model(ids)
    return model, gm, ids, reference


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(before: dict[str, torch.Tensor], module: torch.nn.Module, what: str) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys(), f"{what}: its state keys changed"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"{what}: tensors changed: {changed[:3]}"


def _run_case(case: Case) -> None:
    model, gm, ids, reference = _captured(case.config)
    model_state, graph_state, code = _snapshot(model), _snapshot(gm), gm.code
    try:
        result = condfx.apply(gm, case.pipeline)
    except (ValueError, PassError) as exc:
        first = str(exc).splitlines()[0]
        names = [re.split(r"[{,]", s)[0] for s in case.pipeline.split(",")]
        assert any(n in first for n in names) or "option" in first, first
    else:
        if case.exact and not case.pipeline.endswith("add-kv-cache"):
            with torch.no_grad():
                diff = (result.graph_module(ids) - reference).abs().max().item()
            assert diff <= EXACT_TOL, f"{case}: max |logit diff| {diff:.3g}"
    _assert_same(model_state, model, "the caller's model")
    _assert_same(graph_state, gm, "the captured graph")
    assert gm.code == code, "the captured graph's code changed"


def test_sweep_covers_every_pass():
    assert VARIANTS.keys() == set(_ORDER) == PASSES.keys() - {"add-kv-cache"}


@pytest.mark.parametrize("case", CI_CASES, ids=str)
def test_sweep_random_config_and_pipeline(case):
    _run_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_sweep_random_config_and_pipeline_slow(case):
    _run_case(case)
