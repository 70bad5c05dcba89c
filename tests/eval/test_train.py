"""Tests for condfx.train: loss goes down, trainable selection, safetensors round trip, bad args."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condfx.train import load_trained, train


class TinyLM(nn.Module):
    """Embedding -> linear LM: enough to learn 'predict the current token' (a copy task)."""

    def __init__(self, vocab: int = 16, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))  # (B, T, V)


def copy_batch(step, gen):
    x = torch.randint(0, 16, (8, 12), generator=gen)
    return x, x.clone()


def test_train_reduces_loss_on_copy_task(tmp_path):
    model = TinyLM()
    res = train(
        model,
        copy_batch,
        steps=150,
        lr=3e-2,
        batch_size=8,
        seed=0,
        progress=False,
        save_to=tmp_path / "p.safetensors",
    )
    assert res.steps == 150 and len(res.losses) == 150
    assert sum(res.losses[-10:]) / 10 < 0.3 * sum(res.losses[:10]) / 10
    assert res.trainable_params == ["emb.weight", "head.weight", "head.bias"]
    fresh = TinyLM()
    assert load_trained(fresh, tmp_path / "p.safetensors") == sorted(res.trainable_params)
    for (_, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_respects_trainable_and_restores_requires_grad(tmp_path):
    model = TinyLM()
    model.head.bias.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(
        model,
        copy_batch,
        steps=5,
        trainable=[r"^head\.weight$"],
        progress=False,
        save_to=tmp_path / "h.safetensors",
        schedule="constant",
    )
    assert res.trainable_params == ["head.weight"]
    after = dict(model.named_parameters())
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert torch.equal(after["emb.weight"], before["emb.weight"])
    assert [p.requires_grad for p in model.parameters()] == [True, True, False]
    from safetensors.torch import load_file

    assert list(load_file(str(tmp_path / "h.safetensors"))) == ["head.weight"]
    res = train(model, copy_batch, steps=2, trainable=lambda n: n.startswith("emb"), progress=False)
    assert res.trainable_params == ["emb.weight"]


def test_train_accepts_iterable_data_extra_loss_and_graph_modules():
    model = torch.fx.symbolic_trace(TinyLM())
    gen = torch.Generator().manual_seed(0)
    batches = [copy_batch(i, gen) for i in range(3)]
    calls = []
    res = train(
        model,
        batches,
        steps=3,
        progress=False,
        callback=lambda s, loss, m: calls.append(s),
        extra_loss=lambda m, batch, out: 0.0 * out.sum(),
    )
    assert calls == [0, 1, 2] and len(res.losses) == 3
    with pytest.raises(ValueError, match="ran out"):
        train(model, batches, steps=4, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 2, "lr": 0.0}, ValueError, "lr"),
        ({"steps": 2, "schedule": "linear"}, ValueError, "schedule"),
        ({"steps": 2, "warmup": 2}, ValueError, "warmup"),
        ({"steps": 2, "trainable": ["nope"]}, ValueError, "matches no parameter"),
        ({"steps": 2, "trainable": "emb"}, TypeError, "trainable"),
        ({"steps": 2, "batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        train(TinyLM(), copy_batch, progress=False, **kwargs)


def test_load_trained_rejects_unknown_names(tmp_path):
    from safetensors.torch import save_file

    save_file({"nope.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        load_trained(TinyLM(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        load_trained(TinyLM(), tmp_path / "missing.safetensors")
