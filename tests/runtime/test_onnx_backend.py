"""``OnnxBackend``: stories260K through ONNX Runtime token for token, folder checks, ``from_graph``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from condfx import models_zoo
from condfx.export_bundle import MANIFEST_NAME
from condfx.runtime import Session, TorchBackend, generate
from condfx.runtime.onnx_backend import OnnxBackend
from tests._data import STORIES_ZOO_REFERENCE
from tests.runtime import STORIES, decode_graph, load_model, logits_of, stories_bundle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories():
    """(model, tokenizer, decode graph, export folder) of stories260K, exported once."""
    model, result = decode_graph(STORIES)
    _, tok = load_model(STORIES)
    return model, tok, result.graph_module, stories_bundle()  # checked against PyTorch (<= 1e-4)


def _copy(folder, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def _edit_manifest(folder, **changes):
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_golden_stories_greedy_onnx_equals_torch(stories):
    model, tok, gm, folder = stories
    prompt = tok.encode("Zoo", bos=True)
    onnx_session = Session.from_onnx(folder, model=model)
    torch_session = Session(TorchBackend(gm), max_seq_len=model.info.max_seq_len)
    assert isinstance(onnx_session.backend, OnnxBackend)
    got = generate(onnx_session, [prompt], max_new_tokens=57, greedy=True)[0]
    want = generate(torch_session, [prompt], max_new_tokens=57, greedy=True)[0]
    assert got == want
    assert len(prompt + got) >= 60
    assert tok.decode(prompt + got) == STORIES_ZOO_REFERENCE


def test_numerics_prefill_and_steps_match_full_forward(stories):
    model, _, gm, folder = stories
    backend = OnnxBackend.from_dir(folder)
    session = Session(backend, max_seq_len=backend.max_seq_len)
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = logits_of(model(ids))
    got = [session.prefill(ids[:, :5]), session.step(ids[:, 5:7])]
    got += [session.step(ids[:, i : i + 1]) for i in (7, 8)]
    torch.testing.assert_close(torch.cat(got, 1), expected, atol=1e-4, rtol=1e-4)
    assert backend.layers == tuple(gm.meta["condfx_kv"])
    assert backend.max_seq_len == model.info.max_seq_len


def test_rejects_folder_of_another_model(stories):
    _, _, _, folder = stories
    other, _ = models_zoo.load("llama-tiny")
    with pytest.raises(ValueError, match=r"exported from model 'stories260K', not 'llama-tiny'"):
        OnnxBackend.from_dir(folder, model=other)


def test_rejects_folder_of_other_weights(stories):
    folder = stories[3]
    changed, _ = load_model(STORIES)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=r"other weights of model 'stories260K'"):
        OnnxBackend.from_dir(folder, model=changed)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"condfx_version": "0.0.1"}, r"written by condfx 0\.0\.1, but this is condfx"),
        ({"format_version": 99}, r"has format condfx-onnx 99, but this condfx reads condfx-onnx 2"),
        ({"format_version": 1}, r"written by an older condfx \(manifest format 1.*; write it again"),
        ({"layers": [{"kind": "hologram", "layer": 0}]}, r"kind 'hologram' \(written by condfx \S+\) is not one"),
        ({"format": "other"}, r"has format other"),
        ({"layers": None}, r"without 'layers'"),
    ],
)
def test_rejects_other_versions(stories, tmp_path, changes, message):
    folder = _copy(stories[3], tmp_path)
    _edit_manifest(folder, **changes)
    with pytest.raises(ValueError, match=message):
        OnnxBackend.from_dir(folder)


@pytest.mark.parametrize("name", ["decode.onnx", "prefill.onnx", MANIFEST_NAME])
def test_rejects_missing_file_naming_it(stories, tmp_path, name):
    folder = _copy(stories[3], tmp_path)
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder}.*{name}") as info:
        OnnxBackend.from_dir(folder)
    assert len(str(info.value).splitlines()) == 1


def test_rejects_changed_file_and_missing_folder(stories, tmp_path):
    folder = _copy(stories[3], tmp_path)
    with open(folder / "decode.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(
        ValueError, match=r"decode\.onnx that differs from the one its manifest lists"
    ):
        OnnxBackend.from_dir(folder)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        OnnxBackend.from_dir(tmp_path / "nowhere")


def test_numerics_session_from_model_onnx_backend():
    """``Session.from_model(backend="onnx")`` goes through ``OnnxBackend.from_graph``."""
    model, _ = models_zoo.load("llama-tiny")
    session = Session.from_model(model, backend="onnx")
    assert isinstance(session.backend, OnnxBackend)
    assert session.max_seq_len == model.info.max_seq_len
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)  # (3, 6, V)
    steps = [session.prefill(ids[:, :4]), session.step(ids[:, 4:5]), session.step(ids[:, 5:])]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_golden_stories_greedy_opset23_equals_torch(stories, tmp_path):
    """At opset 23 the decode graph's attention is the standard op with past (``onnx_peephole``):
    the same greedy tokens as PyTorch, and no condfx::Attention left in decode.onnx."""
    import onnx

    from condfx.export_bundle import export_decode_graph, model_identity

    model, tok, gm, _ = stories
    bundle = export_decode_graph(gm, tmp_path, identity=model_identity(model, STORIES), passes="fuse-attention",
                                 opset=23)
    assert bundle.max_abs_diff <= 1e-4
    decode = onnx.load(str(tmp_path / "decode.onnx"), load_external_data=False)
    ops = [(n.domain, n.op_type) for n in decode.graph.node]
    assert ("", "Attention") in ops and ("condfx", "Attention") not in ops
    prompt = tok.encode("Zoo", bos=True)
    got = generate(Session.from_onnx(tmp_path, model=model), [prompt], max_new_tokens=24, greedy=True)[0]
    want = generate(Session(TorchBackend(gm), max_seq_len=model.info.max_seq_len), [prompt], max_new_tokens=24,
                    greedy=True)[0]
    assert got == want
