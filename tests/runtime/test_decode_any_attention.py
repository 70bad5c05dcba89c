"""Decode for every found attention: all-windowed (Mistral v0.1 style), MoE (Mixtral) and GPT-J.

Each model is a small random-weight Hugging Face config, captured and decoded once (module fixtures):
the Session's greedy decode equals transformers' ``generate`` greedy, and the ONNX bundle opened with
``Session.from_onnx`` gives the PyTorch logits within 1e-4 over a prefill and single-token steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import condfx
from condfx.export_bundle import export_decode_graph
from condfx.layouts import PositionLayout
from condfx.models_zoo.hf import CausalLMLogits
from condfx.runtime import Session

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PROMPT, NEW = 128, 6, 12
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)


def _config(kind: str):
    import transformers as tf

    if kind == "mistral-windowed":  # every layer windowed, window well below prompt + new tokens
        return tf.MistralConfig(sliding_window=4, head_dim=16, **_COMMON)
    if kind == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=16, **_COMMON)
    return tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)


class _Built:
    """A small HF model, its decode graph (fuse-attention, add-kv-cache) and the greedy tokens."""

    def __init__(self, kind: str):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        # batched_mm experts: the default grouped_mm experts are a transformers custom op without an ONNX lowering
        kwargs = {"experts_implementation": "batched_mm"} if kind == "mixtral" else {}
        self.hf = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa", **kwargs)
        self.hf = self.hf.float().eval()
        self.model = CausalLMLogits(self.hf, kind)
        gm = condfx.capture(self.model, (torch.zeros(2, 8, dtype=torch.long),))
        self.decode = condfx.apply(condfx.apply(gm, "fuse-attention").graph_module, "add-kv-cache")
        self.prompt = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))


def _greedy(session: Session, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated ids (B, new), logits of every call concatenated (B, T + new - 1, V))."""
    logits = [session.prefill(prompt)]
    tokens = [logits[-1][:, -1].argmax(-1, keepdim=True)]
    for _ in range(new - 1):
        logits.append(session.step(tokens[-1]))
        tokens.append(logits[-1][:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), torch.cat(logits, 1)


@pytest.fixture(scope="module", params=["mistral-windowed", "mixtral", "gptj"])
def built(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _Built(request.param)


def test_numerics_session_greedy_equals_hf_generate(built):
    ours, _ = _greedy(Session.from_graph(built.decode.graph_module), built.prompt, NEW)
    with torch.no_grad():
        hf = built.hf.generate(built.prompt, max_new_tokens=NEW, do_sample=False,
                               attention_mask=torch.ones_like(built.prompt), pad_token_id=0)
    assert torch.equal(ours, hf[:, PROMPT:])


# One ONNX export pair costs ~10 s on a quiet machine: the new cache form (all-windowed) runs in CI,
# the MoE and GPT-J exports under ``-m slow``.
@pytest.mark.parametrize("built", ["mistral-windowed", pytest.param("mixtral", marks=pytest.mark.slow),
                                   pytest.param("gptj", marks=pytest.mark.slow)], indirect=True)
def test_numerics_onnx_bundle_decode_within_1e4_of_torch(built, tmp_path):
    gm = built.decode.graph_module
    tokens, expected = _greedy(Session.from_graph(gm), built.prompt, 5)
    export_decode_graph(gm, tmp_path, verify=False)
    session = Session.from_onnx(tmp_path)
    got = [session.prefill(built.prompt)]
    got += [session.step(tokens[:, i : i + 1]) for i in range(tokens.shape[1] - 1)]
    torch.testing.assert_close(torch.cat(got, 1), expected, atol=1e-4, rtol=0)


def test_matches_position_sources_by_kind(built):
    layouts = built.decode.graph_module.meta["condfx_kv"]
    windowed = built.hf.config.model_type == "mistral"
    assert isinstance(layouts[-1], PositionLayout) == windowed
    assert len(layouts) == 2 + windowed
    assert built.decode.reports[-1].positions == ("arange",)
