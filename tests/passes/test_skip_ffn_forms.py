"""``skip-ffn`` on the FFN forms ``condfx.masked_ffn`` does not carry: the general masked FFN
(``passes/skip_ffn_branch.py``) on tiny transformers models of each form.

Per form: every layer is rewritten; a config under which no row skips reproduces the captured
model's logits (float32, 1e-5); a config under which every row of the last layer skips equals the HF
model with that layer's FFN output replaced by zeros. Decode (add-kv-cache + the torch Session) is
checked on a MoE and a post-norm model, ONNX export on the flattened ReLU MLP of OPT (slow).
"""

from __future__ import annotations

import functools
import tempfile
import warnings

import pytest
import torch

import condfx
from benchmarks.conformance_build import N_LAYERS, build_small
from condfx.passes.skip_ffn import (
    SkipFFN,
    SkipFFNConfig,
    is_countdown_ffn,
    is_masked_ffn,
    measure_skip_fraction,
)
from condfx.passes.skip_ffn_branch import is_masked_branch

NOTHING_SKIPS = "skip-ffn{threshold=1.0,cold_start=0,cold_end=0}"
LAST_SKIPS = "skip-ffn{threshold=0.01,span=1,cold_start=0,cold_end=0}"  # layer 0 runs, layer 1 skips
# form -> (model type, the module whose output is the last layer's FFN contribution before post-norm)
FORMS = {  # about 10-20 s each; Gemma-3's post-norm also runs in CI through tests/models
    "moe-shared-expert": ("qwen2_moe", "model.layers.1.mlp"),
    "relu-flat": ("opt", "model.decoder.layers.1.fc2"),
}
SLOW_FORMS = {  # 25-40 s each on the shared 2-core machine
    "post-norm": ("gemma3_text", "model.layers.1.mlp"),
    "fused-gate-up": ("glm", "model.layers.1.mlp"),
    "moe": ("mixtral", "model.layers.1.mlp"),
    "parallel-block": ("gptj", "transformer.h.1.mlp"),  # a GELU MLP: condfx.masked_ffn carries it
    "relu2": ("nemotron", "model.layers.1.mlp"),
    "scaled-residual": ("granite", "model.layers.1.mlp"),  # multiplier 1 at the small sizes: the op
    "post-norm-only": ("olmo2", "model.layers.1.mlp"),
}
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


@functools.lru_cache(maxsize=2)
def _captured(model_type: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_small(model_type, "sdpa")
        return model, condfx.capture(model, (IDS[:, :9].clone(),))


def _zeroed(model, path: str):
    """The model's logits on IDS with the module at ``path`` returning zeros."""
    module = model.hf.get_submodule(path)
    hook = module.register_forward_hook(lambda m, args, out: torch.zeros_like(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            return model(IDS)
    finally:
        hook.remove()


def _matmuls(gm) -> int:
    """The projection-like nodes of ``gm`` (linear, matmul, grouped experts' matmuls)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and any(
        k in str(n.target) for k in ("linear", "matmul", "mm")))


def _check_form(model_type: str, path: str) -> None:
    model, gm = _captured(model_type)
    with torch.no_grad():
        want = gm(IDS)
    result = condfx.apply(gm, NOTHING_SKIPS)
    assert result.reports[0].rewritten == N_LAYERS, result.reports[0].skipped
    general = sum(is_masked_branch(n) for n in result.graph_module.graph.nodes)
    assert general + sum(is_masked_ffn(n) or is_countdown_ffn(n) for n in result.graph_module.graph.nodes) == N_LAYERS
    if general == N_LAYERS:
        assert _matmuls(result.graph_module) == _matmuls(gm)  # the original FFN nodes are gone, not kept
    with torch.no_grad():
        assert (result.graph_module(IDS) - want).abs().max().item() <= 1e-5
    skipping = condfx.apply(gm, LAST_SKIPS).graph_module
    fractions = list(measure_skip_fraction(skipping, IDS)["per_node"].values())
    assert fractions == [0.0, 1.0], fractions  # layer 0 runs every row, layer 1 none
    with torch.no_grad():
        got = skipping(IDS)
    assert (got - _zeroed(model, path)).abs().max().item() <= 1e-5
    assert (got - want).abs().max().item() > 1e-3  # the skipped layer mattered


@pytest.mark.parametrize("form", [pytest.param(f, marks=pytest.mark.slow) if f != "opt" else f for f in sorted(FORMS)])
def test_numerics_general_masked_ffn_matches_dense_and_zeroed(form):
    _check_form(*FORMS[form])


def test_matches_general_masked_ffn_idempotent():
    _, gm = _captured("opt")
    once = condfx.apply(gm, NOTHING_SKIPS).graph_module
    again = SkipFFN(SkipFFNConfig(cold_start=0, cold_end=0))(once)
    assert not again.modified
    assert [reason for reason, _ in again.report.skipped] == ["already rewritten"] * N_LAYERS


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(SLOW_FORMS))
def test_numerics_general_masked_ffn_matches_dense_and_zeroed_more_forms(form):
    _check_form(*SLOW_FORMS[form])


def _greedy_full(gm, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, gm(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_moe", "gemma3_text"])
def test_numerics_general_masked_ffn_decode_equals_full_sequence(model_type):
    """Token-by-token decoding through add-kv-cache and the Session, with rows skipping, gives the
    greedy tokens of the rewritten graph run on the whole sequence (decisions are per row)."""
    from condfx.runtime.generate import generate
    from condfx.runtime.session import Session

    model, gm = _captured(model_type)
    spec = "skip-ffn{threshold=0.5,span=1,cold_start=0,cold_end=0}"
    full = condfx.apply(gm, spec).graph_module
    decode = condfx.apply(gm, spec + ",fuse-attention,add-kv-cache").graph_module
    prompt = [1, 17, 42, 99, 5, 63]
    session = Session.from_graph(decode, max_seq_len=model.info.max_seq_len)
    got = generate(session, [prompt], max_new_tokens=6)[0]
    assert got == _greedy_full(full, prompt, 6)
    ids = torch.tensor([prompt])
    assert 0.0 < measure_skip_fraction(full, ids)["fraction"] < 1.0  # rows did skip


@pytest.mark.slow
def test_numerics_general_masked_ffn_onnx_export():
    """The flattened ReLU MLP of OPT in its general masked form exports to ONNX (standard ops)."""
    from condfx.export_bundle import export_decode_graph

    _, gm = _captured("opt")
    spec = "skip-ffn{threshold=0.5,span=1,cold_start=0,cold_end=0},fuse-attention,add-kv-cache"
    decode = condfx.apply(gm, spec).graph_module
    with tempfile.TemporaryDirectory() as out:
        bundle = export_decode_graph(decode, out, passes="fuse-attention")
    assert bundle.max_abs_diff <= 1e-4
