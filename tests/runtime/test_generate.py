"""Tests of sampling and ``generate``: greedy golden text, seeds, top-k/top-p, streaming, batches, errors."""

from __future__ import annotations

import pytest
import torch

from condfx.eval import greedy
from condfx.runtime import SamplingConfig, Session, TorchBackend, filter_logits, generate
from tests._data import STORIES_ZOO_REFERENCE
from tests.runtime import STORIES, decode_graph, load_model

# data/README.md's reference sentence, continued to 60 new tokens.
GOLDEN_ZOO = STORIES_ZOO_REFERENCE + " it.\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories():
    model, result = decode_graph(STORIES)
    _, tok = load_model(STORIES)
    return (
        model,
        tok,
        Session(TorchBackend(result.graph_module), max_seq_len=model.info.max_seq_len),
    )


@pytest.fixture(scope="module")
def llama():
    model, result = decode_graph("llama-tiny")
    return model, Session(TorchBackend(result.graph_module), max_seq_len=model.info.max_seq_len)


def test_golden_stories260k_greedy_with_cache_equals_no_cache_loop(stories):
    model, tok, session = stories
    prompt = tok.encode("Zoo", bos=True)
    (cached,) = generate(session, ["Zoo"], tokenizer=tok, max_new_tokens=60, greedy=True)
    assert cached == greedy(model, None, prompt, 60)
    assert tok.decode(prompt + cached) == GOLDEN_ZOO


def test_numerics_mixed_length_batch_equals_one_prompt_at_a_time(llama):
    _, session = llama
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13], [40]]
    together = generate(session, prompts, max_new_tokens=5, greedy=True)
    alone = [generate(session, [p], max_new_tokens=5, greedy=True)[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 5 for t in together)


def test_numerics_greedy_equals_no_cache_loop_llama(llama):
    model, session = llama
    out = generate(session, [[3, 14, 15, 92]], max_new_tokens=8, temperature=0.0)
    assert out[0] == greedy(model, None, [3, 14, 15, 92], 8)


def test_sampling_with_seed_is_reproducible(llama):
    _, session = llama
    opts = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=123)
    a = generate(session, [[1, 2, 3], [4, 5, 6]], **opts)
    b = generate(session, [[1, 2, 3], [4, 5, 6]], **opts)
    c = generate(session, [[1, 2, 3], [4, 5, 6]], **{**opts, "seed": 124})
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy(llama):
    _, session = llama
    greedy = generate(session, [[8, 9, 10]], max_new_tokens=10, greedy=True)
    top1 = generate(session, [[8, 9, 10]], max_new_tokens=10, top_k=1, temperature=2.0, seed=5)
    assert top1 == greedy


def test_stream_called_once_per_token_in_order(llama):
    _, session = llama
    seen = []
    out = generate(
        session,
        [[1, 2], [3, 4, 5]],
        max_new_tokens=4,
        greedy=True,
        stream=lambda i, tok: seen.append((i, tok)),
    )
    assert len(seen) == 8
    assert [t for i, t in seen if i == 0] == out[0]
    assert [t for i, t in seen if i == 1] == out[1]


def test_stop_ids_end_row_and_keep_stop_token(llama):
    _, session = llama
    free = generate(session, [[20, 21], [22, 23]], max_new_tokens=6, greedy=True)
    stop = free[0][2]
    out = generate(session, [[20, 21], [22, 23]], max_new_tokens=6, greedy=True, stop_ids=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]
    expected_1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out[1] == expected_1


def test_rejects_unknown_option_and_bad_values(llama):
    _, session = llama
    with pytest.raises(
        ValueError,
        match="Unknown sampling option 'topk'; allowed options: greedy, "
        "temperature, top_k, top_p, seed",
    ):
        generate(session, [[1]], topk=3)
    bad = [
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]; got 0.0"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"temperature": -1.0}, "temperature must be a number >= 0; got -1.0"),
        ({"top_k": -2}, "top_k must be an int >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0; got -1"),
    ]
    for options, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            generate(session, [[1]], **options)


def test_rejects_prompt_longer_than_context_and_bad_prompts(llama):
    _, session = llama
    with pytest.raises(
        ValueError, match="prompt 1 has 513 tokens, more than the model's context of 512"
    ):
        generate(session, [[1], [2] * 513], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt 0 is a string; pass tokenizer="):
        generate(session, ["hello"])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(session, [[]])
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        generate(session, "hello")


def test_generation_stops_at_context(llama):
    _, session = llama
    out = generate(session, [[1] * 510, [2] * 512], max_new_tokens=10, greedy=True)
    assert [len(t) for t in out] == [2, 0]  # prompt + new tokens <= 512


def test_filter_logits_top_k_and_top_p_numbers():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept_p.tolist() == [[True, True, False, False]]
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept_p.tolist() == [[True, True, True, False]]
    kept_k = torch.isfinite(filter_logits(logits[:, [3, 0, 2, 1]], top_k=2))
    assert kept_k.tolist() == [[False, True, False, True]]
    assert SamplingConfig(temperature=0).is_greedy and not SamplingConfig().is_greedy


def test_default_without_sampling_options_is_greedy(stories):
    model, tok, session = stories
    (default,) = generate(session, ["Zoo"], tokenizer=tok, max_new_tokens=20)
    assert default == greedy(model, None, tok.encode("Zoo", bos=True), 20)
    assert not SamplingConfig.from_options(temperature=0.7).greedy
    assert SamplingConfig.from_options(seed=3).greedy
