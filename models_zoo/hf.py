"""Hugging Face models: tiny test subjects, GGUF files and local folders, all behind one wrapper.

``CausalLMLogits`` gives every loaded transformers model the zoo contract
``forward(input_ids (B, T) int64) -> logits (B, T, V)``; the transformers model stays at ``.hf``.
transformers is imported only inside these functions, so importing the zoo stays fast.

Does not handle: remote code, downloads (folders are read with ``local_files_only=True``), GGUF
architectures other than ``SUPPORTED_ARCHITECTURES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .info import ModelInfo
from .llama import AttnImpl, parse_attn_impl
from .tokenizers import HFTokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class CausalLMLogits(nn.Module):
    """Wrap a transformers causal LM so ``forward(input_ids)`` returns the logits tensor.

    Args:
        hf: the transformers model (``...ForCausalLM`` / ``GPT2LMHeadModel``).
        name: a name for ``info`` (zoo name or file stem).
    """

    def __init__(self, hf: nn.Module, name: str) -> None:
        super().__init__()
        self.hf = hf
        self.info = info_from_hf_config(hf.config, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits  # (B, T, V)


def info_from_hf_config(config: Any, name: str) -> ModelInfo:
    """Summarise a transformers config as a ``ModelInfo``."""
    n_heads = config.num_attention_heads
    dim = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or dim // n_heads
    hidden = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return ModelInfo(
        name=name,
        family=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        dim=dim,
        hidden_dim=hidden or 4 * dim,
        vocab_size=config.vocab_size,
        max_seq_len=config.max_position_embeddings,
    )


def _tiny_config(kind: str, attn_impl: AttnImpl) -> Any:
    import transformers as tf

    # BOS/EOS are ByteTokenizer's STX/ETX so the ids fit the 256-token vocabulary.
    common = dict(
        vocab_size=256, bos_token_id=2, eos_token_id=3, attn_implementation=attn_impl.value
    )
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **common,
    )
    if kind == "llama":
        return tf.LlamaConfig(**llama_like)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like)
    return tf.Qwen3Config(head_dim=16, **llama_like)


def _model_class(config: Any) -> type:
    import transformers as tf

    classes = {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
    }
    return classes[config.model_type]


def build_hf(kind: str, attn_impl: AttnImpl | str = "sdpa", seed: int = 0) -> nn.Module:
    """Build a tiny, seeded transformers model (2 layers, hidden 64, 4 heads, vocab 256).

    Args:
        kind: one of ``SUPPORTED_ARCHITECTURES`` (llama, qwen2, qwen3 with 2 KV heads; gpt2).
        attn_impl: ``"sdpa"`` or ``"eager"``.
        seed: init seed; the global RNG state is restored afterwards.

    Returns:
        The transformers model in eval mode, float32 (not wrapped).

    Raises:
        ValueError: unknown ``kind`` or ``attn_impl``.
    """
    if kind not in SUPPORTED_ARCHITECTURES:
        msg = f"build_hf kind must be one of {set(SUPPORTED_ARCHITECTURES)}; got {kind!r}."
        raise ValueError(msg)
    config = _tiny_config(kind, parse_attn_impl(attn_impl, "build_hf attn_impl"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(config)(config)
    return model.float().eval()


def gguf_architecture(path: str | Path) -> str:
    """Return ``general.architecture`` of a GGUF file, read with ``gguf.GGUFReader``."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on bad files
        msg = f"{path} could not be read as a GGUF file: {err}"
        raise ValueError(msg) from err
    field = reader.fields.get("general.architecture")
    if field is None:
        msg = f"GGUF file {path} has no general.architecture key."
        raise ValueError(msg)
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def load_gguf(
    path: str | Path, *, attn_impl: AttnImpl | str | None = None
) -> tuple[CausalLMLogits, HFTokenizer]:
    """Load a GGUF file through transformers (weights dequantized to float32).

    Args:
        path: the ``.gguf`` file.
        attn_impl: ``"sdpa"`` or ``"eager"``; ``None`` keeps transformers' default.

    Returns:
        ``(model, tokenizer)``, the model wrapped in ``CausalLMLogits`` and in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file or architecture not in ``SUPPORTED_ARCHITECTURES``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        msg = f"GGUF file {path} does not exist."
        raise FileNotFoundError(msg)
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        msg = (
            f"GGUF file {path.name} has architecture {arch!r}; supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
        raise ValueError(msg)
    kwargs = _attn_kwargs(attn_impl)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    return CausalLMLogits(hf.eval(), path.stem).eval(), HFTokenizer(tokenizer)


def load_hf_folder(
    path: str | Path, *, attn_impl: AttnImpl | str | None = None
) -> tuple[CausalLMLogits, HFTokenizer]:
    """Load a local Hugging Face folder (safetensors weights, no remote code, no downloads).

    Args:
        path: folder with ``config.json``, ``*.safetensors`` and tokenizer files.
        attn_impl: ``"sdpa"`` or ``"eager"``; ``None`` keeps transformers' default.

    Returns:
        ``(model, tokenizer)``, the model wrapped in ``CausalLMLogits``, float32, eval mode.

    Raises:
        FileNotFoundError: the folder, its config.json or its tokenizer files are missing.
        ValueError: the model type is not in ``SUPPORTED_ARCHITECTURES``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        msg = f"{path} is not a Hugging Face model folder: config.json is missing."
        raise FileNotFoundError(msg)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        msg = (
            f"Model folder {path} has model_type {config.model_type!r}; supported types are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
        raise ValueError(msg)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        looked = ", ".join(_TOKENIZER_FILES)
        msg = f"Model folder {path} has no tokenizer files (looked for {looked})."
        raise FileNotFoundError(msg)
    hf = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=torch.float32,
        **_attn_kwargs(attn_impl),
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return CausalLMLogits(hf.eval(), path.name).eval(), HFTokenizer(tokenizer)


def _attn_kwargs(attn_impl: AttnImpl | str | None) -> dict[str, str]:
    if attn_impl is None:
        return {}
    return {"attn_implementation": parse_attn_impl(attn_impl).value}
