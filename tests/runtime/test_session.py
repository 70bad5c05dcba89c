"""Tests of ``Session``: prefill/step numerics, cache bytes, errors, backends."""

from __future__ import annotations

import pytest
import torch

from condfx.passes import PassError
from condfx.runtime import FullKVCache, Session, TorchBackend
from tests._helpers import ToyStack
from tests.runtime import decode_graph, load_model, logits_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    model, result = decode_graph("llama-tiny")
    return model, Session(TorchBackend(result.graph_module), max_seq_len=model.info.max_seq_len)


def _ids(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_numerics_prefill_and_steps_equal_full_forward(llama):
    model, session = llama
    ids = _ids(3, 10)
    with torch.no_grad():
        expected = logits_of(model(ids))
    logits = [session.prefill(ids[:, :6])]
    logits += [session.step(ids[:, i : i + 1]) for i in range(6, 10)]
    assert session.position == 10
    torch.testing.assert_close(torch.cat(logits, 1), expected, atol=1e-5, rtol=1e-5)


def test_numerics_step_with_several_tokens(llama):
    model, session = llama
    ids = _ids(1, 9, seed=3)
    with torch.no_grad():
        expected = logits_of(model(ids))
    got = torch.cat(
        [session.prefill(ids[:, :2]), session.step(ids[:, 2:7]), session.step(ids[:, 7:])], 1
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_steps_grow_the_caches_in_place_and_leave_the_graph_as_written(llama):
    model, session = llama
    n_layers = model.info.n_layers
    assert session.backend.in_place == 2 * n_layers  # every layer's K and V cat became append_kv
    cats = [n for n in session.backend.gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(cats) >= 2 * n_layers  # the caller's graph (export, ONNX) keeps its concatenations
    ids = _ids(2, 8, seed=5)
    with torch.no_grad():
        expected = logits_of(model(ids))
    logits = [session.prefill(ids[:, :5])]
    where = session.caches[0].k.data_ptr()
    logits += [session.step(ids[:, i : i + 1]) for i in range(5, 8)]
    assert session.caches[0].k.data_ptr() == where and session.caches[0].k.shape[2] == 8
    torch.testing.assert_close(torch.cat(logits, 1), expected, atol=1e-5, rtol=1e-5)


def test_cache_bytes_equal_sum_of_tensor_bytes(llama):
    model, session = llama
    session.prefill(_ids(2, 5))
    session.step(_ids(2, 1, seed=1))
    info = model.info
    tensors = session.caches.past()
    assert session.cache_bytes() == sum(t.nbytes for t in tensors)
    assert session.cache_bytes() == 2 * info.n_layers * 2 * info.n_kv_heads * 6 * info.head_dim * 4
    assert all(isinstance(c, FullKVCache) for c in session.caches)


def test_prefill_resets_previous_state(llama):
    _, session = llama
    first = session.prefill(_ids(1, 4, seed=7))
    session.step(_ids(1, 1))
    again = session.prefill(_ids(1, 4, seed=7))
    assert session.position == 4
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_rejects_step_before_prefill():
    _, result = decode_graph("llama-tiny")
    session = Session.from_graph(result.graph_module)
    with pytest.raises(ValueError, match="step called before Session.prefill"):
        session.step(_ids(1, 1))


def test_rejects_bad_ids_batch_and_context(llama):
    _, session = llama
    with pytest.raises(ValueError, match=r"int64 token ids of shape \(B, T\); got \(4,\)"):
        session.prefill(torch.zeros(4, dtype=torch.long))
    session.prefill(_ids(2, 3))
    with pytest.raises(ValueError, match="batch 1 differs from the prefill batch 2"):
        session.step(_ids(1, 1))
    with pytest.raises(
        ValueError, match="would reach 513 tokens, more than the model's context of 512"
    ):
        session.prefill(_ids(1, 513))


def test_from_model_gpt2_end_to_end():
    model, _ = load_model("gpt2-tiny")
    session = Session.from_model(model, example_len=6)
    ids = _ids(2, 7, seed=2)
    with torch.no_grad():
        expected = model(ids)
    got = torch.cat(
        [session.prefill(ids[:, :3])] + [session.step(ids[:, i : i + 1]) for i in range(3, 7)], 1
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [r.pass_name for r in session.reports] == ["fuse-attention", "add-kv-cache"]


def test_rejects_bad_backend_and_unfusable_model():
    model, _ = load_model("llama-tiny")
    with pytest.raises(ValueError, match=r"backend must be one of \{torch, onnx\}; got 'tensorrt'"):
        Session.from_model(model, backend="tensorrt")
    with pytest.raises(ValueError, match="example_len must be a positive int; got 0"):
        Session.from_model(model, example_len=0)
    with pytest.raises(ValueError, match="needs the decode form"):
        TorchBackend(torch.fx.symbolic_trace(ToyStack()))


def test_rejects_pipeline_without_fused_attention():
    model, _ = load_model("llama-tiny")
    with pytest.raises(PassError, match="run fuse-attention first"):
        Session.from_model(model, passes=[])
