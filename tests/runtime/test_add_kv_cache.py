"""Tests of ``add-kv-cache``: decode signature, positions, rejections, numerics on every family."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import condfx
from condfx.models_zoo import LlamaConfig, LlamaModel
from condfx.passes import PassError
from condfx.passes.add_kv_cache import AddKVCache, KVCacheReport, find_position_aranges
from tests._helpers import ToyStack, assert_close_exact
from tests.runtime import decode_graph, empty_past, load_model, logits_of

MODELS = ["llama-tiny", "qwen3-tiny", "gpt2-tiny", "hf-llama", "hf-gpt2", "stories260K"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(model, batch=2, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.info.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("name", MODELS)
def test_numerics_decode_form_with_empty_past_equals_model(name):
    model, result = decode_graph(name)
    gm, ids = result.graph_module, _ids(model)
    with torch.no_grad():
        expected = logits_of(model(ids))
        out = gm(ids, *empty_past(gm, 2))
    assert len(out) == 1 + 2 * model.info.n_layers
    assert_close_exact(out[0], expected)


@pytest.mark.parametrize("name", MODELS)
def test_numerics_prefill_then_single_token_decode_equals_full_forward(name):
    model, result = decode_graph(name)
    gm, ids, n = result.graph_module, _ids(model), 4
    with torch.no_grad():
        expected = logits_of(model(ids))  # (B, T, V)
        out = gm(ids[:, :n], *empty_past(gm, 2))
        logits, past = [out[0]], list(out[1:])
        for i in range(n, ids.shape[1]):
            out = gm(ids[:, i : i + 1], *past)
            logits.append(out[0])
            past = list(out[1:])
    assert past[0].shape[2] == ids.shape[1]
    torch.testing.assert_close(torch.cat(logits, 1), expected, atol=1e-5, rtol=1e-5)


def test_matches_decode_signature_and_report_llama():
    model, result = decode_graph("llama-tiny")
    gm, report = result.graph_module, result.reports[-1]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in inputs] == ["input_ids", "past_k_0", "past_v_0", "past_k_1", "past_v_1"]
    assert isinstance(report, KVCacheReport)
    assert (report.matched, report.rewritten, report.positions) == (2, 2, ("arange",))
    assert "positions offset by the cache length: arange" in report.to_markdown()
    # one new symbol per layer for P, distinct from T; B shared
    ids_shape = inputs[0].meta["val"].shape
    pk0, pk1 = (inputs[i].meta["val"].shape for i in (1, 3))
    assert str(pk0[0]) == str(ids_shape[0]) and str(pk0[2]) != str(ids_shape[1])
    assert str(pk0[2]) != str(pk1[2])
    assert tuple(pk0[1::2]) == (2, 16)
    kinds = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.arange.start in kinds and torch.ops.aten.arange.default not in kinds
    assert all("val" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function"))


def test_matches_gpt2_learned_positions():
    _, result = decode_graph("gpt2-tiny")
    assert result.reports[-1].positions == ("arange",)
    gm = result.graph_module
    embeds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert any(e.args[1].target is torch.ops.aten.arange.start for e in embeds)


def test_rejects_unfused_graph_with_hint():
    model, _ = load_model("llama-tiny")
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    with pytest.raises(PassError, match="run fuse-attention first"):
        condfx.apply(gm, "add-kv-cache")


class _TableRoPE(LlamaModel):
    """A Llama whose RoPE tables are precomputed buffers sliced to T: no arange to offset."""

    def __init__(self, cfg):
        super().__init__(cfg)
        cos, sin = super().rope_cos_sin(cfg.max_seq_len, torch.device("cpu"))
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def rope_cos_sin(self, t, device):
        return self.cos_table[:t], self.sin_table[:t]


def test_rejects_rope_table_without_arange():
    model = _TableRoPE(LlamaConfig(n_layers=1)).eval()
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    with pytest.raises(PassError, match=r"position-dependent value 'slice\w*' is not an arange"):
        condfx.apply(gm, "fuse-attention, add-kv-cache")


def test_idempotent_second_run_not_modified():
    _, result = decode_graph("llama-tiny")
    again = AddKVCache()(result.graph_module)
    assert not again.modified
    assert again.report.skip_counts() == {"already in decode form": 1}


def test_matches_windowed_attention_without_positions():
    torch.manual_seed(0)
    model = ToyStack(layers=2, form="eager", window=3).eval()
    x = torch.randn(2, 9, 16)
    result = condfx.apply(condfx.capture(model, (x[:, :5],)), "fuse-attention, add-kv-cache")
    gm = result.graph_module
    assert [s.window for s in gm.meta["condfx_kv"]] == [3, 3]
    assert result.reports[-1].positions == ()
    with torch.no_grad():
        out = gm(x, *[torch.zeros(2, 2, 0, 4) for _ in range(4)])
        assert_close_exact(out[0], model(x))


def test_golden_position_arange_found_on_hf_llama():
    _, result = decode_graph("hf-llama")
    assert result.reports[-1].positions == ("arange",)
    assert re.search(r"arange\.start", result.graph_module.code)


def test_matches_find_position_aranges_only_for_seq_length():
    model, _ = load_model("llama-tiny")
    gm = condfx.apply(
        condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),)), "fuse-attention"
    ).graph_module
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert [n.name for n in find_position_aranges(gm, ids)] == ["arange"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
