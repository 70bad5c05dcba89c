"""The default pipeline on every zoo model: expected region counts and exact logits after fuse-attention."""

import pytest
import torch

import condfx
from condfx.models_zoo import META_ONLY, ZOO, build_zoo, load
from condfx.patterns import find_regions
from tests._data import require_data

# name -> (attention regions, FFN regions, FFN kind); every zoo model has two layers.
EXPECTED = {
    "llama-tiny": (2, 2, "swiglu"),
    "llama-tiny-eager": (2, 2, "swiglu"),
    "qwen2-tiny": (2, 2, "swiglu"),
    "qwen3-tiny": (2, 2, "swiglu"),
    "gpt2-tiny": (2, 2, "gelu-mlp"),
    "gpt2-tiny-eager": (2, 2, "gelu-mlp"),
    "hf-llama": (2, 2, "swiglu"),
    "hf-llama-eager": (2, 2, "swiglu"),
    "hf-qwen2": (2, 2, "swiglu"),
    "hf-qwen2-eager": (2, 2, "swiglu"),
    "hf-qwen3": (2, 2, "swiglu"),
    "hf-qwen3-eager": (2, 2, "swiglu"),
    "hf-gpt2": (2, 2, "gelu-mlp"),
    "hf-gpt2-eager": (2, 2, "gelu-mlp"),
}


def test_every_zoo_model_has_an_expectation():
    assert set(EXPECTED) == set(ZOO) - set(META_ONLY)


def _check(model, vocab: int, expected: tuple[int, int, str]):
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = condfx.capture(model, (ids,))
    regions = find_regions(gm)
    n_attn, n_ffn, kind = expected
    assert len(regions.attention) == n_attn and len(regions.ffn) == n_ffn
    assert {f.kind.value for f in regions.ffn} == {kind}
    result = condfx.apply(gm, "fuse-attention")
    assert result.reports[0].rewritten == n_attn
    other = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(other) - result.graph_module(other)).abs().max().item()
    assert diff <= 1e-5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_numerics_fuse_attention_exact_on_zoo(name):
    model = build_zoo(name)
    _check(model, model.info.vocab_size, EXPECTED[name])


def test_numerics_fuse_attention_exact_on_stories260k():
    model, _ = load(require_data("stories260K.bin"))
    _check(model, 512, (5, 5, "swiglu"))
