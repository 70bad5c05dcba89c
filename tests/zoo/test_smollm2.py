"""SmolLM2-135M (real weights, 30 layers, GQA 9/3): regions, exact fuse-attention, perplexity, greedy.

The model is loaded once for the module (about 16 s on 2 idle cores).
"""

import math

import pytest
import torch

import condfx
from condfx.eval import greedy, perplexity_of_text
from condfx.models_zoo import load
from condfx.patterns import find_regions
from tests._data import require_data

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load(require_data(GGUF))
    gm = condfx.capture(model, (torch.randint(0, 1000, (2, 8)),))
    return model, tok, gm


def test_matches_30_attention_and_30_ffn_regions(smollm2):
    _, _, gm = smollm2
    regions = find_regions(gm)
    assert len(regions.attention) == 30 and len(regions.ffn) == 30
    assert {(a.num_heads, a.num_kv_heads, a.head_dim) for a in regions.attention} == {(9, 3, 64)}
    assert [b.layer for b in regions.blocks] == list(range(30))
    assert not regions.failures


def test_numerics_fuse_attention_is_exact(smollm2):
    model, tok, gm = smollm2
    result = condfx.apply(gm, "fuse-attention")
    assert result.reports[0].rewritten == 30
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog near the river bank.")])
    with torch.no_grad():
        diff = (model(ids) - result.graph_module(ids)).abs().max().item()
    assert diff <= 1e-5


def test_golden_capital_of_france(smollm2):
    model, tok, _ = smollm2
    prompt = tok.encode("The capital of France is")  # SmolLM2 uses no BOS
    out = greedy(model, tok, prompt, 3)
    assert tok.decode(out).startswith(" Paris.")


def test_golden_wikitext_perplexity_first_4096_tokens(smollm2):
    model, tok, _ = smollm2
    text = require_data("wikitext2_raw_test.txt").read_text(encoding="utf-8")
    res = perplexity_of_text(model, tok, text, max_tokens=4096)  # one 4096-token window
    assert res.tokens == 4095
    assert math.isfinite(res.ppl)
    assert res.ppl == pytest.approx(17.557, abs=0.05)  # the README's figure (`condfx eval ... --max-tokens 4096`)
