"""Training an IHA graph through ``condfx.train``: only the new parameters, or all; saved state."""

from __future__ import annotations

import copy
import functools

import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
from condfx.passes.interleave_heads import IHA_PARAMETERS
from condfx.train import load_trained, train

TASK = MQARConfig(vocab_size=32, num_pairs=4, seq_len=24)


@functools.cache
def _iha_graph():
    model = build_mqar_model(TASK, 0, dim=32, n_layers=2, n_heads=2).eval()
    gm = condfx.capture(model, (torch.zeros(2, TASK.seq_len, dtype=torch.long),))
    return condfx.apply(gm, "interleave-heads{P=2,window=8,layers=[0]}, interleave-heads{P=2,layers=[1]}").graph_module


def _data(step, gen):
    return make_mqar_batch(TASK, 16, gen)


def test_numerics_train_only_new_parameters_and_reload(tmp_path):
    gm = copy.deepcopy(_iha_graph())
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    result = train(gm, _data, steps=6, lr=1e-2, trainable=[IHA_PARAMETERS], progress=False,
                   save_to=tmp_path / "iha.safetensors")
    changed = {n for n, p in gm.named_parameters() if not torch.equal(p, before[n])}
    assert sorted(result.trainable_params) == sorted(changed)
    assert len(changed) == 8 and all(".iha_" in n for n in changed)  # 2 layers x (3 mixes + collapse)
    fresh = copy.deepcopy(_iha_graph())
    assert sorted(load_trained(fresh, tmp_path / "iha.safetensors")) == sorted(changed)
    ids = make_mqar_batch(TASK, 2, torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(fresh(ids), gm(ids), atol=0, rtol=0)


def test_numerics_train_all_parameters_lowers_the_loss():
    gm = copy.deepcopy(_iha_graph())
    result = train(gm, _data, steps=40, lr=3e-3, progress=False)
    assert len(result.trainable_params) == len(list(gm.parameters()))
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.2
