"""Tests for condfx.eval.tasks: MQAR generator invariants and passkey prompts."""

from __future__ import annotations

import pytest
import torch

from condfx.eval import MQARConfig, make_mqar_batch, make_passkey_prompt, mqar_accuracy
from condfx.models_zoo import ByteTokenizer


@pytest.mark.parametrize(
    "cfg", [MQARConfig(), MQARConfig(vocab_size=32, num_pairs=4, gap=20, seq_len=48, num_queries=3)]
)
def test_mqar_batch_invariants(cfg):
    x, y = make_mqar_batch(cfg, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, cfg.seq_len)
    key_range = set(range(1, 1 + cfg.n_keys))
    value_range = set(range(1 + cfg.n_keys, cfg.vocab_size))
    assert not key_range & value_range and 0 not in key_range | value_range
    for b in range(16):
        keys, values = (
            x[b, 0 : 2 * cfg.num_pairs : 2].tolist(),
            x[b, 1 : 2 * cfg.num_pairs : 2].tolist(),
        )
        assert set(keys) <= key_range and set(values) <= value_range
        assert len(set(keys)) == cfg.num_pairs
        pair_of = {k: i for i, k in enumerate(keys)}
        positions = (y[b] != -100).nonzero().flatten().tolist()
        assert len(positions) == cfg.queries
        for p in positions:
            key = int(x[b, p])
            i = pair_of[key]
            assert int(y[b, p]) == values[i]  # target at the query key is its value
            assert p + 1 >= cfg.seq_len or int(x[b, p + 1]) == cfg.filler_id  # value is not an input
            assert p - (2 * i + 1) >= cfg.gap
        assert (y[b, : cfg.query_start] == -100).all()


def test_mqar_batch_is_deterministic():
    a = make_mqar_batch(MQARConfig(), 4, torch.Generator().manual_seed(3))
    b = make_mqar_batch(MQARConfig(), 4, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_pairs": 40}, "num_pairs"),
        ({"gap": 0}, "gap"),
        ({"seq_len": 20}, "seq_len"),
        ({"num_queries": 9}, "num_queries"),
    ],
)
def test_rejects_bad_mqar_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**kwargs)


def test_mqar_accuracy_of_an_oracle_is_one():
    cfg = MQARConfig(vocab_size=32, num_pairs=4, seq_len=32)

    class Oracle(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, cfg.vocab_size)
            for b in range(input_ids.shape[0]):
                table = {
                    int(input_ids[b, 2 * i]): int(input_ids[b, 2 * i + 1])
                    for i in range(cfg.num_pairs)
                }
                for t in range(2 * cfg.num_pairs, input_ids.shape[1]):
                    logits[b, t, table.get(int(input_ids[b, t]), 0)] = 1.0
            return logits

    assert mqar_accuracy(Oracle(), cfg, n=8, seed=0) == 1.0


BACKGROUND = " ".join(f"word{i % 97} is here." for i in range(2000))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_hides_key_at_depth(depth):
    tok = ByteTokenizer()
    ids = make_passkey_prompt(tok, BACKGROUND, 12345, 1500, depth)
    assert ids[0] == tok.bos_id
    assert 1400 <= len(ids) <= 1500
    text = tok.decode(ids[1:])
    needle = "The pass key is 12345. Remember it. 12345 is the pass key."
    assert text.count(needle) == 1
    assert text.endswith("What is the pass key? The pass key is")
    rel = text.index(needle) / (len(text) - len(needle))
    assert rel == pytest.approx(depth, abs=0.05)


def test_rejects_bad_passkey_arguments():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="depth"):
        make_passkey_prompt(tok, BACKGROUND, 1, 500, 1.5)
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompt(tok, "a few words", 1, 500, 0.5)
    with pytest.raises(ValueError, match="n_tokens"):
        make_passkey_prompt(tok, BACKGROUND, 1, 10, 0.5)


def test_train_mqar_model_runs_and_is_scored():
    cfg = MQARConfig(vocab_size=16, num_pairs=2, seq_len=12)
    from condfx.eval import train_mqar_model

    model = train_mqar_model(cfg, steps=3, seed=0, batch_size=4, dim=16, n_heads=2)
    assert model(torch.zeros(1, 12, dtype=torch.long)).shape == (1, 12, 16)
    assert 0.0 <= mqar_accuracy(model, cfg, n=8, seed=0) <= 1.0


@pytest.mark.slow  # 250 training steps; test_build_mqar_model_loads_trained_parameters covers the code path
def test_train_mqar_model_learns_recall():
    # the Zoology layout (query values only as targets) is learnt in ~200 steps; with the value as an
    # input after its query key, training sat at ~50 % (eliminating values already answered)
    from condfx.eval.tasks import DEMO_MQAR, train_mqar_model

    model = train_mqar_model(DEMO_MQAR, steps=250, seed=0)
    acc = mqar_accuracy(model, DEMO_MQAR, n=256, seed=123)
    assert acc >= 0.9, f"MQAR accuracy {acc:.3f} after 250 steps; chance is 1/4"


def test_build_mqar_model_loads_trained_parameters(tmp_path):
    from condfx.eval.tasks import build_mqar_model, train_mqar_model
    from condfx.train import load_trained

    cfg = MQARConfig(vocab_size=16, num_pairs=2, seq_len=12)
    path = tmp_path / "m.safetensors"
    trained = train_mqar_model(cfg, steps=3, seed=0, batch_size=4, dim=16, save_to=path)
    fresh = build_mqar_model(cfg, seed=1, dim=16)
    load_trained(fresh, path)
    x = make_mqar_batch(cfg, 2, torch.Generator().manual_seed(0))[0]
    assert torch.equal(fresh.eval()(x), trained(x))
