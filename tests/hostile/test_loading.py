"""Hostile model files: each is refused with one sentence naming the file or key and the problem.

Every file is generated here in tmp folders: tiny Hugging Face folders written by transformers'
``save_pretrained`` then damaged, GGUF files written with the ``gguf`` package's ``GGUFWriter``,
and llama2.c checkpoints written in the documented layout (shared/data/README.md). The good
variants load with finite logits; three refusals also go through the CLI (exit 2, one line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import condfx
from condfx.models_zoo import load

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_IDS = torch.tensor([[1, 5, 9, 12, 30, 7]])


def _save_byte_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)


def _tiny_hf(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    configs: dict[str, Callable[[], object]] = {
        "llama": lambda: tf.LlamaConfig(
            **_SIZES, num_key_value_heads=2, tie_word_embeddings=False, **common
        ),
        "mistral": lambda: tf.MistralConfig(
            **_SIZES, num_key_value_heads=2, sliding_window=None, **common
        ),
        "gemma": lambda: tf.GemmaConfig(**_SIZES, num_key_value_heads=1, head_dim=16, **common),
        "bert": lambda: tf.BertConfig(**_SIZES, vocab_size=VOCAB),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **_SIZES, num_key_value_heads=1, head_dim=16, pad_token_id=0, **common
        ),
        "t5": lambda: tf.T5Config(
            vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16
        ),
    }
    classes = {
        "llama": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "gemma": tf.GemmaForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
        "bert": tf.BertForMaskedLM,
        "t5": tf.T5ForConditionalGeneration,
    }
    torch.manual_seed(0)
    return classes[kind](configs[kind]()).eval()


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    for kind in ("llama", "mistral", "gemma", "bert", "t5"):
        _tiny_hf(kind).save_pretrained(root / kind)
        _save_byte_tokenizer(root / kind)
    return root


def _damaged(
    root: Path,
    name: str,
    edit_state: Callable[[dict], dict] | None = None,
    edit_config: Callable[[dict], None] | None = None,
) -> Path:
    """A copy of the llama folder with its weights and/or config edited."""
    from safetensors.torch import load_file, save_file

    folder = root / name
    if folder.exists():
        return folder
    shutil.copytree(root / "llama", folder)
    if edit_state is not None:
        state = edit_state(load_file(folder / "model.safetensors"))
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], dict]:
    return lambda sd: {**sd, key: make(sd[key])}


_UP = "model.layers.1.mlp.up_proj.weight"
_Q = "model.layers.0.self_attn.q_proj.weight"
_HF_STATE_CASES = {
    "missing-layer-tensor": (
        _drop(_UP),
        r"is missing weights the model needs: model\.layers\.1\.mlp\.up_proj\.weight",
    ),
    "missing-lm-head": (
        _drop("lm_head.weight"),
        r"is missing weights the model needs: lm_head\.weight",
    ),
    "wrong-prefix": (
        lambda sd: {k.replace("model.", "decoder."): v for k, v in sd.items()},
        r"is missing weights the model needs: .*model\.layers\.0\..* and \d+ more",
    ),
    "extra-tensor": (
        lambda sd: {**sd, "model.layers.0.extra.weight": torch.zeros(4)},
        r"has tensors the model does not have: model\.layers\.0\.extra\.weight",
    ),
    "wrong-shape": (
        _replace(_UP, lambda w: w[:100]),
        r"wrong shape: model\.layers\.1\.mlp\.up_proj\.weight is \[100, 64\], the config implies \[128, 64\]",
    ),
    "nan": (
        _replace(_Q, lambda w: w.index_fill(0, torch.tensor([3]), float("nan"))),
        r"has NaN or infinite values in weight model\.layers\.0\.self_attn\.q_proj\.weight",
    ),
    "int32": (
        _replace(_UP, lambda w: (w * 100).to(torch.int32)),
        r"model\.safetensors has tensor 'model\.layers\.1\.mlp\.up_proj\.weight' of dtype I32; "
        r"condfx loads floating-point weights only",
    ),
}


@pytest.mark.parametrize("case", sorted(_HF_STATE_CASES))
def test_rejects_hf_folder_with_bad_weights(hf_root, case):
    edit, pattern = _HF_STATE_CASES[case]
    folder = _damaged(hf_root, case, edit_state=edit)
    with pytest.raises(ValueError, match=pattern) as info:
        load(folder)
    assert folder.name in str(info.value)


_HF_CONFIG_CASES = {
    "more-layers": (
        lambda c: c.update(num_hidden_layers=3),
        r"is missing weights the model needs: model\.layers\.2\.",
    ),
    "fewer-layers": (
        lambda c: c.update(num_hidden_layers=1),
        r"has tensors the model does not have: model\.layers\.1\.",
    ),
    "heads-not-dividing": (
        lambda c: c.update(num_attention_heads=5, num_key_value_heads=5, head_dim=None),
        r"config\.json has 5 attention heads, which do not divide the hidden size 64",
    ),
    "heads-not-dividing-with-head-dim": (  # Llama's own validator refuses it: its sentence
        lambda c: c.update(num_attention_heads=5, num_key_value_heads=5),
        r"config\.json: .*The hidden size \(64\) is not a multiple of the number of attention heads",
    ),
    "zero-heads": (
        lambda c: c.update(num_attention_heads=0),
        r"config\.json has num_attention_heads = 0; it must be a positive integer",
    ),
    "unknown-type": (
        lambda c: c.update(model_type="condfx-nonesuch"),
        r"config\.json has model_type 'condfx-nonesuch', which transformers \S+ does not know",
    ),
}


@pytest.mark.parametrize("case", sorted(_HF_CONFIG_CASES))
def test_rejects_hf_folder_with_bad_config(hf_root, case):
    edit, pattern = _HF_CONFIG_CASES[case]
    folder = _damaged(hf_root, case, edit_config=edit)
    with pytest.raises(ValueError, match=rf"{case}.*{pattern}"):
        load(folder)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"config\.json is empty"),
        ("{not json", r"config\.json is not valid JSON"),
        ("[1, 2]", r"config\.json must hold a JSON object"),
    ],
)
def test_rejects_unreadable_config_json(hf_root, tmp_path, text, pattern):
    folder = tmp_path / "model"
    shutil.copytree(hf_root / "llama", folder)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"model/{pattern}"):
        load(folder)


def _bytes_edit(root: Path, name: str, edit: Callable[[bytes], bytes]) -> Path:
    folder = root / name
    if not folder.exists():
        shutil.copytree(root / "llama", folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(edit(weights.read_bytes()))
    return folder


@pytest.mark.parametrize(
    ("case", "edit", "pattern"),
    [
        (
            "truncated",
            lambda b: b[: len(b) - 1000],
            r"model\.safetensors is truncated: its header describes \d+ bytes, the file has \d+",
        ),
        (
            "header-garbage",
            lambda b: b[:8] + b"\xff\xfe" + b[10:],
            r"model\.safetensors has a corrupt safetensors header \(not JSON",
        ),
        (
            "header-length",
            lambda b: struct.pack("<Q", 2**40) + b[8:],
            r"model\.safetensors is not a safetensors file or is truncated",
        ),
    ],
)
def test_rejects_corrupt_safetensors(hf_root, case, edit, pattern):
    with pytest.raises(ValueError, match=rf"{case}/{pattern}"):
        load(_bytes_edit(hf_root, case, edit))


def test_rejects_index_shard_outside_the_folder(hf_root, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_root / "llama", folder)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    keys = json.loads(_safetensors_header(tmp_path / "outside.safetensors"))
    weight_map = {k: "../outside.safetensors" for k in keys if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        ValueError,
        match=r"names shard '\.\./outside\.safetensors' for .*, which is outside the model folder",
    ):
        load(folder)


def test_numerics_sharded_folder_loads_and_a_missing_shard_is_refused(hf_root, tmp_path):
    folder = tmp_path / "sharded"
    _tiny_hf("llama").save_pretrained(folder, max_shard_size="100KB")
    _save_byte_tokenizer(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    reference, _ = load(hf_root / "llama")
    model, _ = load(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(_IDS), reference(_IDS))
    shards[-1].unlink()
    with pytest.raises(
        ValueError, match=rf"names shard '{shards[-1].name}' for .*, which does not exist"
    ):
        load(folder)


def _safetensors_header(path: Path) -> str:
    data = path.read_bytes()
    return data[8 : 8 + struct.unpack("<Q", data[:8])[0]].decode()


def test_rejects_pickle_only_folder(hf_root, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_root / "llama", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    with pytest.raises(
        ValueError,
        match=r"holds pickle weights \(pytorch_model\.bin\), which condfx will not load; convert them to safetensors",
    ):
        load(folder)


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        (
            "bert",
            r"holds a 'bert' model, an encoder-only model; condfx needs a decoder-only causal LM",
        ),
        (
            "t5",
            r"holds a 't5' model, an encoder-decoder model; condfx needs a decoder-only causal LM",
        ),
    ],
)
def test_rejects_encoder_models(hf_root, kind, pattern):
    with pytest.raises(ValueError, match=rf"Model folder .*{kind} {pattern}"):
        load(hf_root / kind)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma"])
def test_numerics_hf_folder_of_any_decoder_loads(hf_root, kind):
    model, _ = load(hf_root / kind, attn_impl="eager")
    assert model.info.family == kind and model.info.n_layers == 2
    with torch.no_grad():
        logits = model(_IDS)
        assert logits.shape == (1, 6, VOCAB) and bool(torch.isfinite(logits).all())
        if kind == "gemma":  # not a zoo architecture: the same logits as transformers' own model
            reference = _tiny_hf("gemma").to(logits.dtype)
            reference.config._attn_implementation = "eager"  # noqa: SLF001 (as load asks for)
            torch.testing.assert_close(logits, reference(input_ids=_IDS, use_cache=False).logits)


# GGUF -------------------------------------------------------------------------------------------


def _interleave_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Half-split to llama.cpp's interleaved-pair row order (what convert_hf_to_gguf writes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names (gguf-py's own name map), stored as llama.cpp does."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    arch = model.config.model_type
    names = get_tensor_name_map(
        {"llama": MODEL_ARCH.LLAMA, "gemma3_text": MODEL_ARCH.GEMMA3}[arch], 2
    )
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        name, w = names.get_name(key.rsplit(".", 1)[0]) + ".weight", value.numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _interleave_rope(w, 4 if "attn_q" in name else 2)
        if arch == "gemma3_text" and "norm" in name:
            w = w + 1  # llama.cpp stores Gemma's norm scale 1 + w
        tensors[name] = w
    return tensors


def _write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    arch: str = "llama",
    heads: int = 4,
    blocks: int = 2,
    kv_heads: int = 2,
) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(blocks)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma3":  # Gemma3TextConfig's defaults, so the source model's logits are kept
        writer.add_rope_freq_base(1e6)
        writer.add_sliding_window(4096)
    else:
        writer.add_rope_dimension_count(16)
        writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(VOCAB - 3)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3] + [6] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in tensors.items():
        dtype = np.int32 if array.dtype == np.int32 else np.float32
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_source():
    return _tiny_hf("llama")


@pytest.fixture(scope="module")
def gguf_tensors(gguf_source):
    return _gguf_tensors(gguf_source)


def test_numerics_gguf_of_gemma3_loads_with_the_source_logits(tmp_path):
    source = _tiny_hf("gemma3")
    path = _write_gguf(tmp_path / "gemma3.gguf", _gguf_tensors(source), arch="gemma3", kv_heads=1)
    model, _ = load(path, attn_impl="eager")
    assert model.info.family == "gemma3_text" and model.info.n_layers == 2
    source.config._attn_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(_IDS), source(input_ids=_IDS, use_cache=False).logits)


def test_numerics_gguf_loads_with_the_source_logits(gguf_source, gguf_tensors, tmp_path):
    model, _ = load(_write_gguf(tmp_path / "tiny.gguf", gguf_tensors), attn_impl="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(_IDS), gguf_source(input_ids=_IDS, use_cache=False).logits)


def _rename(tensors: dict, old: str, new: str) -> dict:
    return {new if k == old else k: v for k, v in tensors.items()}


_GGUF_CASES = {
    "zero-heads": (
        dict(heads=0),
        None,
        r"tiny\.gguf has llama\.attention\.head_count = 0; it must be positive",
    ),
    "block-count-over": (
        dict(blocks=3),
        None,
        r"llama\.block_count = 3 but tensors for 2 layers \(blk\.0 to blk\.1\)",
    ),
    "missing-layer": (
        {},
        lambda t: {k: v for k, v in t.items() if not k.startswith("blk.1.")},
        r"llama\.block_count = 2 but tensors for 1 layer \(blk\.0 to blk\.0\)",
    ),
    "block-count-under": (dict(blocks=1), None, r"llama\.block_count = 1 but tensors for 2 layers"),
    "renamed-tensor": (
        {},
        lambda t: _rename(t, "blk.1.attn_q.weight", "blk.1.attn_qq.weight"),
        r"has tensor 'blk\.1\.attn_qq\.weight', which is not a llama tensor name",
    ),
    "missing-tensor": (
        {},
        lambda t: {k: v for k, v in t.items() if k != "blk.1.ffn_up.weight"},
        r"tiny\.gguf is missing weights the model needs: model\.layers\.1\.mlp\.up_proj\.weight",
    ),
    "nan": (
        {},
        lambda t: {**t, "blk.0.attn_v.weight": np.full_like(t["blk.0.attn_v.weight"], np.nan)},
        r"tiny\.gguf has NaN or infinite values in weight model\.layers\.0\.self_attn\.v_proj\.weight",
    ),
    "wrong-shape": (
        {},
        lambda t: {**t, "blk.0.ffn_up.weight": t["blk.0.ffn_up.weight"][:100]},
        r"tiny\.gguf has tensors of the wrong shape: model\.layers\.0\.mlp\.up_proj\.weight is "
        r"\[100, 64\], the config implies \[128, 64\]",
    ),
    "heads-disagree": (  # 8 heads of 16: q_proj would be 128 wide, the tensors are 64
        dict(heads=8),
        None,
        r"wrong shape: model\.layers\.0\.self_attn\.o_proj\.weight is \[64, 64\], the config implies \[64, 128\]",
    ),
    "int32": (
        {},
        lambda t: {**t, "blk.0.ffn_up.weight": (t["blk.0.ffn_up.weight"] * 100).astype(np.int32)},
        r"tiny\.gguf has tensor 'blk\.0\.ffn_up\.weight' of type I32; weights must be floating point",
    ),
    "unknown-architecture": (
        dict(arch="condfxnet"),
        None,
        r"architecture 'condfxnet'; supported architectures are .* this file holds an architecture "
        r"transformers \S+ does not read from GGUF",
    ),
}


def test_rejects_gguf_of_an_encoder_decoder_model(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "t5.gguf"
    writer = GGUFWriter(str(path), "t5")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError,
        match=r"GGUF file t5\.gguf has architecture 't5'; .*decoder-only causal LM.* "
        r"this file holds a 't5' model, an encoder-decoder model",
    ):
        load(path)


@pytest.mark.parametrize("case", sorted(_GGUF_CASES))
def test_rejects_inconsistent_gguf(gguf_tensors, tmp_path, case):
    options, edit, pattern = _GGUF_CASES[case]
    tensors = gguf_tensors if edit is None else edit(gguf_tensors)
    path = _write_gguf(tmp_path / "tiny.gguf", tensors, **options)
    with pytest.raises(ValueError, match=pattern) as info:
        load(path)
    assert str(info.value).startswith("GGUF file tiny.gguf ")


# llama2.c ---------------------------------------------------------------------------------------

_L2C = dict(dim=32, hidden=64, layers=2, heads=4, kv=2, vocab=64, seq=32)


def _write_llama2c(folder: Path, header: tuple[int, ...] | None = None, nan: bool = False) -> Path:
    """A tiny version-0 llama2.c checkpoint (README layout) and its tok64.bin; ``header``
    overrides the 7 ints written, the arrays stay those of ``_L2C``."""
    d, h, n, heads, kv, v, seq = _L2C.values()
    hd = d // heads
    rng = np.random.default_rng(0)
    shapes = [
        (v, d),
        (n, d),
        (n, d, d),
        (n, kv * hd, d),
        (n, kv * hd, d),
        (n, d, d),
        (n, d),
        (n, h, d),
        (n, d, h),
        (n, h, d),
        (d,),
    ]
    arrays = [rng.normal(0, 0.1, s).astype("<f4") for s in shapes]
    if nan:
        arrays[2][0, 0, 0] = np.nan
    angles = np.outer(np.arange(seq), 10000.0 ** (-np.arange(0, hd, 2) / hd))
    arrays += [np.cos(angles).astype("<f4"), np.sin(angles).astype("<f4")]
    path = folder / "tiny.bin"
    with path.open("wb") as f:
        f.write(np.array(header or tuple(_L2C.values()), dtype="<i4").tobytes())
        for array in arrays:
            f.write(array.tobytes())
    pieces = [b"<unk>", b"<s>", b"</s>"] + [
        bytes([97 + i % 26]) * (1 + i // 26) for i in range(v - 3)
    ]
    with (folder / "tok64.bin").open("wb") as f:
        f.write(struct.pack("<i", 4))
        for piece in pieces:
            f.write(struct.pack("<fi", 0.0, len(piece)) + piece)
    return path


def test_numerics_llama2c_tiny_loads(tmp_path):
    model, _ = load(_write_llama2c(tmp_path))
    with torch.no_grad():
        assert bool(torch.isfinite(model(_IDS % 64)).all())


@pytest.mark.parametrize(
    ("header", "nan", "pattern"),
    [
        # heads 4 -> 2, kv 2 -> 1, seq 32 -> 16: every array keeps its size, the RoPE tables differ.
        (
            (32, 64, 2, 2, 1, 64, 16),
            False,
            r"tiny\.bin has a header \(head_dim 16, seq_len 16\) that disagrees with its stored RoPE table freq_cis_real",
        ),
        ((32, 64, 3, 4, 2, 64, 32), False, r"tiny\.bin is truncated: its header implies \d+ bytes"),
        (
            (32, 64, 2, 0, 2, 64, 32),
            False,
            r"tiny\.bin is not a llama2\.c version-0 checkpoint: its header .* non-positive sizes",
        ),
        (None, True, r"tiny\.bin has NaN or infinite values in wq"),
    ],
)
def test_rejects_altered_llama2c(tmp_path, header, nan, pattern):
    with pytest.raises(ValueError, match=pattern):
        load(_write_llama2c(tmp_path, header, nan))


# Through the CLI: one line on stderr, exit 2, no traceback --------------------------------------


def _cli(*argv: str) -> subprocess.CompletedProcess:
    root = str(Path(condfx.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("CONDFX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "condfx.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "source", ["hf-missing-layer", "gguf-zero-heads", "llama2c-altered-header"]
)
def test_rejects_hostile_files_through_the_cli(hf_root, gguf_tensors, tmp_path, source):
    if source == "hf-missing-layer":
        path, command = _damaged(hf_root, "missing-layer-tensor", edit_state=_drop(_UP)), "inspect"
        pattern = r"missing weights the model needs: model\.layers\.1\.mlp\.up_proj\.weight"
    elif source == "gguf-zero-heads":
        path, command = _write_gguf(tmp_path / "tiny.gguf", gguf_tensors, heads=0), "eval"
        pattern = r"head_count = 0"
    else:
        path, command = _write_llama2c(tmp_path, (32, 64, 2, 2, 1, 64, 16)), "generate"
        pattern = r"disagrees with its stored RoPE table"
    extra = {"eval": ["--text", str(path)], "generate": ["--prompt", "hi"]}.get(command, [])
    result = _cli(command, str(path), *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, (
        result.stderr
    )
    assert lines[0].startswith("error: ") and path.name in lines[0]
    assert re.search(pattern, lines[0]), lines[0]
