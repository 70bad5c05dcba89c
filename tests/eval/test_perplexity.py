"""Tests for condfx.eval.perplexity and condfx.eval.generate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condfx.eval import documents_to_ids, greedy, perplexity, split_stories
from tests._data import require_data


class GRULM(nn.Module):
    """A causal LM whose logits depend on the whole prefix: embedding -> GRU -> linear."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(self.emb(input_ids))[0])  # (B, T, V)


def _reference_nll_sum(model, ids: torch.Tensor, context: int, stride: int) -> float:
    """Each token i >= 1 is scored by the first window that contains it and a token before it.

    Windows begin at 0 and then at ``min(begin + stride, end - 1)`` (the HF grid k * stride when
    stride < context).
    """
    total = 0.0
    for i in range(1, len(ids)):
        begin = 0
        while begin + context <= i:
            begin = min(begin + stride, begin + context - 1)
        logits = model(ids[begin:i][None])[0, -1].double()  # predicts token i
        total -= F.log_softmax(logits, -1)[ids[i]].item()
    return total


def test_numerics_full_context_equals_direct_computation():
    model, ids = GRULM(), torch.randint(0, 11, (40,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, ids, context=64)
    with torch.no_grad():
        logits = model(ids[None])[0, :-1].double()
    direct = F.cross_entropy(logits, ids[1:]).item()
    assert res.tokens == 39 and res.windows == 1
    assert res.nll == pytest.approx(direct, abs=1e-9)
    assert res.ppl == pytest.approx(math.exp(direct))


@pytest.mark.parametrize(
    ("context", "stride", "batch_size"), [(8, 3, 1), (8, 8, 1), (8, 5, 4), (6, 1, 3)]
)
def test_numerics_sliding_windows_give_exact_per_token_sum(context, stride, batch_size):
    model, ids = GRULM(), torch.randint(0, 11, (30,), generator=torch.Generator().manual_seed(2))
    res = perplexity(model, ids, context=context, stride=stride, batch_size=batch_size)
    with torch.no_grad():
        expected = _reference_nll_sum(model, ids, context, stride)
    assert res.tokens == 29
    assert res.nll * res.tokens == pytest.approx(expected, rel=1e-6)


def test_numerics_documents_are_scored_independently_and_progress_reports():
    model = GRULM()
    docs = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
    seen = []
    res = perplexity(
        model, docs, context=16, progress=lambda done, total: seen.append((done, total))
    )
    parts = [perplexity(model, d, context=16) for d in docs]
    assert res.tokens == 8
    assert res.nll * 8 == pytest.approx(sum(p.nll * p.tokens for p in parts))
    assert seen[-1] == (8, 8)


def test_rejects_bad_arguments():
    model = GRULM()
    with pytest.raises(ValueError, match="context must be given"):
        perplexity(model, [1, 2, 3])
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [1, 2, 3], context=4, stride=5)
    with pytest.raises(ValueError, match="nothing to score"):
        perplexity(model, [1], context=4)


def test_split_stories_starts_at_story_openers():
    text = "Once upon a time, a cat.\n\nIt sat.\n\nOnce there was a dog.\n\nThe end.\n\n"
    assert split_stories(text) == [
        "Once upon a time, a cat.\n\nIt sat.",
        "Once there was a dog.\n\nThe end.",
    ]


def test_greedy_truncates_from_the_left_and_stops():
    class LastTokenPlusOne(nn.Module):
        def forward(self, input_ids):
            self.seen = input_ids.shape[1]
            return F.one_hot((input_ids + 1) % 10, 10).float()  # (B, T, V)

    model = LastTokenPlusOne()
    assert greedy(model, None, [3], 4, max_seq_len=2) == [4, 5, 6, 7]
    assert model.seen == 2
    assert greedy(model, None, [3], 9, stop_ids=(6,)) == [4, 5, 6]


@pytest.mark.slow  # 200 stories at context 512; about a minute even on a quiet machine
def test_golden_stories260k_nll_over_first_200_stories():
    from condfx.models_zoo import load

    model, tokenizer = load(require_data("stories260K.bin"))
    text = require_data("tinystories_valid_head.txt").read_text(encoding="utf-8")
    docs = documents_to_ids(text, tokenizer, max_docs=200)
    res = perplexity(model, docs, context=512, batch_size=16)
    assert len(docs) == 200
    assert res.nll == pytest.approx(1.23, abs=0.05), res
