"""IHA at decode time: pseudo-K/V caches (P rows per token) in a torch Session.

The ONNX bundle of an IHA model (decode through ONNX Runtime) is checked by
``benchmarks/iha_runtime.py``; one export costs about a minute, too much for every CI run.
"""

from __future__ import annotations

import functools

import pytest
import torch

import condfx
from condfx.runtime.caches import InterleavedKVCache
from condfx.runtime.session import Session
from tests._iha import captured

SPEC = "interleave-heads{P=2,window=4,init_noise=0.1,layers=[0]}, fuse-attention"


@functools.cache
def _model():
    from condfx.models_zoo import load

    return load("llama-tiny")[0]


def _ids():
    return torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(0))


def _decode_all(session, ids, prompt):
    outs = [session.prefill(ids[:, :prompt])]
    outs += [session.step(ids[:, t : t + 1]) for t in range(prompt, ids.shape[1])]
    return torch.cat(outs, dim=1)


@functools.cache
def _torch_session():
    return Session.from_model(_model(), passes=SPEC)


def test_numerics_decode_matches_full_forward_and_cache_bytes():
    gm, _ = captured("llama-tiny")
    ids = _ids()
    expected = condfx.apply(gm, SPEC.replace(", fuse-attention", "")).graph_module(ids)
    session = _torch_session()
    got = _decode_all(session, ids, 6)
    assert (got - expected).abs().max().item() < 1e-5
    iha, plain = session.caches[0], session.caches[1]
    assert isinstance(iha, InterleavedKVCache) and iha.length == plain.length == 11
    assert iha.stored == 2 * plain.stored and iha.nbytes() == 2 * plain.nbytes()  # P x the KV cache
    assert session.position == 11


def test_rejects_rows_that_are_not_whole_tokens():
    cache = InterleavedKVCache(1, 2, 4, pseudo=3)
    with pytest.raises(ValueError, match="4 new rows are not a multiple of pseudo=3"):
        cache.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="pseudo must be a positive int; got 0"):
        InterleavedKVCache(1, 2, 4, pseudo=0)
