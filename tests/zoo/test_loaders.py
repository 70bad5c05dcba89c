"""Loaders, tokenizers, the data setting: stories260K golden text, bad inputs, HF folders, GGUF."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from condfx import data
from condfx.models_zoo import (
    ZOO,
    ByteTokenizer,
    HFTokenizer,
    Llama2cTokenizer,
    build_hf,
    load,
    load_llama2c,
)
from tests._data import STORIES_ZOO_REFERENCE, require_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(require_data("stories260K.bin"), require_data("tok512.bin"))


@pytest.fixture(scope="module")
def tok512():
    return Llama2cTokenizer.from_file(require_data("tok512.bin"))


def _greedy(model, ids: list[int], n_new: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n_new):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0].tolist()


def test_golden_stories260k_greedy_llama2c_steps(stories):
    model, tok = stories
    prompt = tok.encode("Zoo")
    assert prompt == [1, 410, 469, 347]
    out = _greedy(model, prompt, 61 - len(prompt))  # llama2.c -n 60: 61 tokens incl. BOS
    assert tok.decode(out) == STORIES_ZOO_REFERENCE


def test_golden_stories260k_greedy_60_new_tokens(stories):
    model, tok = stories
    out = _greedy(model, tok.encode("Zoo"), 60)
    assert tok.decode(out) == STORIES_ZOO_REFERENCE + " it.\n"


def test_numerics_stories260k_eager_matches_sdpa_and_load(stories):
    model, tok = stories
    eager, _ = load(require_data("stories260K.bin"), attn_impl="eager")
    assert eager.info.name == "stories260K" and eager.info.n_kv_heads == 4 and not eager.training
    x = torch.tensor([tok.encode("Once upon a time, there was a dog.")])
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), atol=1e-5, rtol=1e-5)


def _quadratic_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's merge loop verbatim: scan every pair, merge the best, repeat."""
    ids = [tok.bos_id, *tok._initial_ids(text)]
    while True:
        best = (-1e10, -1, -1)
        for i in range(len(ids) - 1):
            tid = tok._lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if tid is not None and tok.scores[tid] > best[0]:
                best = (tok.scores[tid], tid, i)
        if best[2] == -1:
            return ids
        ids[best[2] : best[2] + 2] = [best[1]]


def test_numerics_tokenizer_matches_run_c_merge_loop(tok512):
    text = require_data("tinystories_valid_head.txt").read_text()[:2000] + " héllo 😀 日本\tok"
    assert tok512.encode(text) == _quadratic_encode(tok512, text)


@pytest.mark.parametrize(
    "text", ["Zoo", "Once upon a time.\nThe end!", "héllo 😀 日本", "", "  two  spaces"]
)
def test_numerics_tokenizer_round_trip(tok512, text):
    ids = tok512.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 512 for i in ids)
    assert tok512.decode(ids) == text
    assert tok512.decode(tok512.encode(text, bos=False)) == text


def test_numerics_tokenizer_byte_fallback(tok512):
    ids = tok512.encode("😀", bos=False)
    assert ids[1:] == [b + 3 for b in "😀".encode()]  # after the dummy-space token
    assert tok512.vocab_size == 512 and tok512.pieces[3] == b"<0x00>"


def test_numerics_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo", eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "héllo"


def test_rejects_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No model file or folder at .*nope\.bin"):
        load(str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError, match=r"llama2.c checkpoint .* does not exist"):
        load_llama2c(tmp_path / "nope.bin")


def test_rejects_truncated_bin(tmp_path):
    src = require_data("stories260K.bin")
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes(src.read_bytes()[:500_000])
    shutil.copy(require_data("tok512.bin"), tmp_path / "tok512.bin")
    with pytest.raises(
        ValueError,
        match=r"stories260K\.bin is truncated: .*implies 1056540 bytes, the file has 500000",
    ):
        load(bad)
    bad.write_bytes(src.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"truncated: expected at least 28 bytes"):
        load(bad)


def test_rejects_unknown_zoo_name():
    with pytest.raises(
        ValueError, match=r"Unknown model 'llama-huge'; zoo names are: .*llama-tiny.*\.gguf"
    ):
        load("llama-huge")
    assert "llama-tiny" in ZOO


def test_rejects_unsupported_file_kind(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(
        ValueError, match=r"Cannot load .*weights\.txt: expected a llama2.c checkpoint"
    ):
        load(path)


def test_rejects_gguf_of_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "tiny-mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError,
        match=r"architecture 'mamba'; supported architectures are llama, qwen2, qwen3, gpt2",
    ):
        load(path)


def _save_byte_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_numerics_hf_folder_round_trip(tmp_path, kind):
    hf = build_hf(kind, seed=2)
    hf.save_pretrained(tmp_path)
    _save_byte_tokenizer(tmp_path)
    model, tok = load(tmp_path, attn_impl="eager")
    assert model.info.family == kind and model.info.name == tmp_path.name and not model.training
    assert tok.decode(tok.encode("hi there")) == "hi there"
    x = torch.tensor([tok.encode("hi there", bos=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(input_ids=x, use_cache=False).logits)


def test_rejects_hf_folder_without_tokenizer(tmp_path):
    build_hf("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files"):
        load(tmp_path)


def test_data_file_checks_hash_and_reports_missing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  a.txt\n{'0' * 64}  gone.txt\n")
    monkeypatch.setenv("CONDFX_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    with pytest.raises(
        data.DataFileError, match=r"'a.txt' in .* has SHA256 [0-9a-f]{64}, expected 0{64}"
    ):
        data.data_file("a.txt")
    assert data.data_file("a.txt", check_hash=False) == tmp_path / "a.txt"
    with pytest.raises(FileNotFoundError, match=r"Data file 'gone.txt' is missing from"):
        data.data_file("gone.txt")
    monkeypatch.setenv("CONDFX_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"CONDFX_DATA points to .*nowhere"):
        data.data_dir()


def test_require_data_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "SHA256SUMS").write_text("")
    monkeypatch.setenv("CONDFX_DATA", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"data file 'x.bin' unavailable"):
        require_data("x.bin")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"data file 'x.bin' unavailable"):
        require_data("x.bin")


class _FakeHF:
    """The slice of a transformers tokenizer HFTokenizer uses; adds BOS like Llama when asked."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return [1, *ids] if add_special_tokens and self.adds_bos else ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 2)

    def __len__(self):
        return 256


@pytest.mark.parametrize("adds_bos", [True, False])
def test_numerics_hf_tokenizer_adds_bos_only_when_the_model_does(adds_bos):
    tok = HFTokenizer(_FakeHF(adds_bos))
    assert tok.encode("ab") == ([1] if adds_bos else []) + [97, 98]
    assert tok.encode("ab", bos=False, eos=True) == [97, 98, 2]
    assert tok.decode(tok.encode("ab", eos=True)) == "ab" and tok.vocab_size == 256
