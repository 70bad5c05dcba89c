"""Hostile runtime inputs: token ids, batch company, seeds, reorder indices, capture's shared weights.

Token ids outside the vocabulary are one ValueError in both backends (ONNX Runtime would wrap -1 to
the last row); a prompt's sampled tokens do not depend on the other prompts of its batch; seeds
outside [0, 2**63 - 1] are refused; a bad ``reorder`` index leaves the session as it was; the
pipeline never writes to the weights ``capture()`` shares with the caller's model; the pipelines the
issue found raising NotImplementedError run.
"""

from __future__ import annotations

import pytest
import torch

import condfx
from condfx.cli import main
from condfx.codegen.bundle import weights_sha256
from condfx.passes import PassError
from condfx.runtime import SamplingConfig, Session, TorchBackend, generate
from condfx.runtime.onnx_backend import OnnxBackend
from tests.runtime import STORIES, decode_graph, load_model, stories_bundle

MODEL = "llama-tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    """(model, torch session, ONNX session): llama-tiny (vocab 256) in PyTorch, and the stories260K
    bundle (vocab 512) the runtime tests export once on ONNX Runtime."""
    model, result = decode_graph(MODEL)
    torch_session = Session(TorchBackend(result.graph_module), max_seq_len=model.info.max_seq_len)
    stories = load_model(STORIES)[0]
    return model, torch_session, Session.from_onnx(stories_bundle(), model=stories)


@pytest.mark.parametrize(("backend", "vocab"), [("torch", 256), ("onnx", 512)])
@pytest.mark.parametrize("bad", [-1, "vocab", 2**40])
def test_rejects_token_ids_outside_the_vocabulary(llama, backend, vocab, bad):
    session = llama[1] if backend == "torch" else llama[2]
    bad = vocab if bad == "vocab" else bad
    sentence = rf"token id {bad} is outside the vocabulary \[0, {vocab - 1}\]\.$"
    with pytest.raises(ValueError, match=rf"^Session\.prefill: {sentence}"):
        session.prefill(torch.tensor([[1, bad, 3]]))
    session.prefill(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=rf"^Session\.step: {sentence}"):
        session.step(torch.tensor([[bad]]))
    with pytest.raises(ValueError, match=rf"^generate\(\): prompt 1: {sentence}"):
        generate(session, [[1, 2], [3, bad]], max_new_tokens=2)
    if backend == "onnx":  # the backend itself refuses too, for callers without a Session
        with pytest.raises(ValueError, match=rf"^OnnxBackend\.run: {sentence}"):
            session.backend.run(torch.tensor([[bad]]), session.caches.past())
        assert isinstance(session.backend, OnnxBackend)


def test_sampled_tokens_do_not_depend_on_batch_company(llama):
    _, session, _ = llama
    opts = dict(max_new_tokens=8, temperature=1.0, seed=11)
    a, b, c, d = [5, 6, 7], [9, 10, 11], [40, 41, 42], [3, 4]
    first = generate(session, [a, b], **opts)
    assert generate(session, [a, c], **opts)[0] == first[0]  # same-length company changed
    assert generate(session, [a, b, c], **opts)[:2] == first  # one more prompt after them
    assert generate(session, [d, b], **opts)[1] == first[1]  # prompt 1 alone in its length group
    assert generate(session, [a], **opts)[0] == first[0]
    stop = first[0][1]  # row 0 stops early and is dropped: row 1 keeps its own stream
    stopped = generate(session, [a, b], stop_ids=[stop], **opts)
    assert stopped[0] == first[0][: first[0].index(stop) + 1]
    if stop not in first[1]:
        assert stopped[1] == first[1]
    assert generate(session, [a, b], **{**opts, "seed": 12}) != first


@pytest.mark.parametrize("seed", [2**63, 2**64, -1, 1.5])
def test_rejects_seeds_outside_the_range(llama, seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\]; got "):
        generate(llama[1], [[1, 2]], max_new_tokens=1, temperature=1.0, seed=seed)


def test_largest_seed_samples_and_cli_refuses_a_huge_seed(llama, capsys):
    out = generate(llama[1], [[1, 2]], max_new_tokens=2, temperature=1.0, seed=2**63 - 1)
    assert len(out[0]) == 2
    assert SamplingConfig(seed=0).seed == 0
    code = main(["generate", MODEL, "--prompt", "hi", "--temperature", "1", "--seed", str(2**63)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "seed" in err and "2**63 - 1" in err


def _state(session: Session) -> list[torch.Tensor]:
    return [t.clone() for t in session.caches.past()]


@pytest.mark.parametrize(
    ("index", "pattern"),
    [
        (torch.tensor([0, 5]), r"row 5 is outside the batch of 3 rows \[0, 2\]"),
        ([2, -1], r"row -1 is outside the batch of 3 rows"),
        (torch.tensor([[0, 1]]), r"needs a non-empty 1-D integer index of rows; got shape \(1, 2\)"),
        (torch.tensor([0.0, 1.0]), r"needs a non-empty 1-D integer index of rows; got shape \(2,\) torch\.float32"),
        ([], r"needs a non-empty 1-D integer index of rows"),
    ],
)
def test_reorder_with_a_bad_index_leaves_the_session_untouched(llama, index, pattern):
    _, session, _ = llama
    session.prefill(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
    before = _state(session)
    with pytest.raises(ValueError, match=rf"^Session\.reorder.*{pattern}"):
        session.reorder(index)
    assert [c.batch for c in session.caches] == [3] * len(session.caches)
    assert all(torch.equal(a, b) for a, b in zip(before, session.caches.past(), strict=True))
    session.step(torch.tensor([[1], [2], [3]]))  # still usable with its three rows
    session.reorder([2, 0])
    assert session.caches[0].batch == 2 and session.step(torch.tensor([[1], [2]])).shape[0] == 2


def test_reorder_before_prefill_is_refused():
    _, result = decode_graph(MODEL)
    with pytest.raises(ValueError, match=r"Session\.reorder called before Session\.prefill"):
        Session(TorchBackend(result.graph_module)).reorder([0])


@pytest.fixture(scope="module")
def captured(llama):
    """(model, its weights hash before anything ran, the captured graph)."""
    model = llama[0]
    before = weights_sha256(model)
    return model, before, condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))


def test_capture_shares_weights_and_passes_never_write_them(captured):
    model, before, gm = captured
    name, param = next(iter(model.named_parameters()))
    assert gm.get_parameter(name) is param  # shared, as capture() documents
    spec = "fuse-attention, skip-ffn{cold_start=0,cold_end=0}, route-attention, quantize-kv{method=kivi}, add-kv-cache"
    result = condfx.apply(gm, spec)
    assert all(r.rewritten for r in result.reports)
    assert not any(p is param for p in result.graph_module.parameters())
    with pytest.raises(PassError, match="route-attention"):  # fails after interleave-heads ran
        condfx.apply(gm, "fuse-attention, interleave-heads, route-attention")
    assert weights_sha256(model) == before
    # route-attention then quantize-kv (once a NotImplementedError in the Session) decodes
    session = Session.from_graph(result.graph_module, max_seq_len=model.info.max_seq_len)
    assert [len(o) for o in generate(session, [[1, 2, 3]], max_new_tokens=3, greedy=True)] == [3]


def test_quantize_kv_32_bits_decodes_as_the_plain_graph(llama, captured):
    """quantize-kv{bits=32} (once a NotImplementedError in the Session) quantizes nothing."""
    _, _, gm = captured
    result = condfx.apply(gm, "fuse-attention, quantize-kv{bits=32}, add-kv-cache")
    session = Session.from_graph(result.graph_module, max_seq_len=512)
    prompt = [[1, 2, 3]]
    got = generate(session, prompt, max_new_tokens=3, greedy=True)
    assert got == generate(llama[1], prompt, max_new_tokens=3, greedy=True)
