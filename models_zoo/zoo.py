"""The zoo: named tiny builders and ``load`` for names and files.

Every model ``load`` returns is in eval mode and carries ``model.info`` (a ``ModelInfo``).
transformers is imported only when a Hugging Face model, GGUF file or folder is asked for.
The zoo imports the builders; the builders never import the zoo (``ModelInfo`` lives in ``info``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .gpt2 import GPT2Config, GPT2Model
from .llama import AttnImpl, LlamaConfig, LlamaModel, parse_attn_impl
from .tokenizers import ByteTokenizer, Tokenizer

FILE_KINDS = "a llama2.c checkpoint (.bin), a GGUF file (.gguf) or a local Hugging Face folder"


# A builder: (seed, attn_impl or None for the entry's default) -> model.
Builder = Callable[..., nn.Module]

_TINY_LLAMA = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172)
_LLAMA_7B = dict(
    vocab_size=32000,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    hidden_dim=11008,
    max_seq_len=4096,
)


def _own_llama(
    name: str, default: AttnImpl, options: dict, seed: int = 0, attn_impl: AttnImpl | None = None
) -> nn.Module:
    cfg = LlamaConfig(**options, attn_impl=attn_impl or default)
    return LlamaModel(cfg, seed=seed, name=name)


def _own_gpt2(
    name: str, default: AttnImpl, seed: int = 0, attn_impl: AttnImpl | None = None
) -> nn.Module:
    cfg = GPT2Config(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=256,
        attn_impl=attn_impl or default,
    )
    return GPT2Model(cfg, seed=seed, name=name)


def _hf(
    name: str, kind: str, default: AttnImpl, seed: int = 0, attn_impl: AttnImpl | None = None
) -> nn.Module:
    from .hf import CausalLMLogits, build_hf

    return CausalLMLogits(build_hf(kind, attn_impl or default, seed), name)


def _zoo() -> dict[str, Builder]:
    sdpa, eager = AttnImpl.SDPA, AttnImpl.EAGER
    zoo: dict[str, Builder] = {
        "llama-tiny": functools.partial(_own_llama, "llama-tiny", sdpa, _TINY_LLAMA),
        "llama-tiny-eager": functools.partial(_own_llama, "llama-tiny-eager", eager, _TINY_LLAMA),
        "qwen3-tiny": functools.partial(
            _own_llama, "qwen3-tiny", sdpa, {**_TINY_LLAMA, "qk_norm": True}
        ),
        "qwen2-tiny": functools.partial(
            _own_llama, "qwen2-tiny", sdpa, {**_TINY_LLAMA, "qkv_bias": True}
        ),
        "gpt2-tiny": functools.partial(_own_gpt2, "gpt2-tiny", sdpa),
        "gpt2-tiny-eager": functools.partial(_own_gpt2, "gpt2-tiny-eager", eager),
    }
    for kind in ("llama", "qwen2", "qwen3", "gpt2"):
        zoo[f"hf-{kind}"] = functools.partial(_hf, f"hf-{kind}", kind, sdpa)
        zoo[f"hf-{kind}-eager"] = functools.partial(_hf, f"hf-{kind}-eager", kind, eager)
    zoo["llama-7b-shape"] = functools.partial(_own_llama, "llama-7b-shape", sdpa, _LLAMA_7B)
    return zoo


ZOO: dict[str, Builder] = _zoo()
"""Named tiny builders: ``ZOO[name](seed=0, attn_impl=None) -> nn.Module``."""

META_ONLY: frozenset[str] = frozenset({"llama-7b-shape"})
"""Zoo entries too large to materialise: build them with ``device="meta"``."""


def build_zoo(
    name: str,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_impl: AttnImpl | str | None = None,
) -> nn.Module:
    """Build the zoo model ``name`` in eval mode on ``device``.

    Args:
        name: a key of ``ZOO``.
        device: target device; ``"meta"`` builds without allocating or initialising weights.
        seed: init seed.
        attn_impl: override the entry's attention implementation (``"sdpa"`` / ``"eager"``).

    Raises:
        ValueError: unknown name, bad ``attn_impl``, or a meta-only entry on a real device.
    """
    if name not in ZOO:
        msg = f"Unknown zoo model {name!r}; zoo names are: {', '.join(sorted(ZOO))}."
        raise ValueError(msg)
    device = torch.device(device)
    if name in META_ONLY and device.type != "meta":
        msg = f"Zoo model {name!r} is for shapes only; build it with device='meta', not {device}."
        raise ValueError(msg)
    impl = None if attn_impl is None else parse_attn_impl(attn_impl)
    if device.type == "meta":
        with torch.device("meta"):
            model = ZOO[name](seed=seed, attn_impl=impl)
    else:
        model = ZOO[name](seed=seed, attn_impl=impl).to(device)
    return model.eval()


def load(
    spec: str | Path, *, attn_impl: AttnImpl | str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """Load a model by zoo name or from a file or folder.

    Args:
        spec: a ``ZOO`` name, or the path of a llama2.c ``.bin`` checkpoint, a ``.gguf`` file or
            a local Hugging Face folder.
        attn_impl: ``"sdpa"`` or ``"eager"``; ``None`` keeps each source's default.
        device: where the model is placed.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and has ``model.info``. Zoo models come
        with a ``ByteTokenizer``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unknown name, an unsupported file kind, or a bad ``attn_impl``;
            ``LoadError`` (a ``ValueError``) for a file or folder the loaders refuse.
    """
    if isinstance(spec, str) and spec in ZOO:
        return build_zoo(spec, device=device, attn_impl=attn_impl), ByteTokenizer()
    path = Path(spec)
    if path.is_file() and path.suffix == ".bin":
        from .llama2c import load_llama2c

        model, tok = load_llama2c(path, attn_impl=attn_impl or AttnImpl.SDPA)
    elif path.is_file() and path.suffix == ".gguf":
        from .hf import load_gguf

        model, tok = load_gguf(path, attn_impl=attn_impl)
    elif path.is_dir():
        from .hf import load_hf_folder

        model, tok = load_hf_folder(path, attn_impl=attn_impl)
    elif path.exists():
        msg = f"Cannot load {path}: expected {FILE_KINDS}."
        raise ValueError(msg)
    elif isinstance(spec, Path) or _looks_like_path(str(spec)):
        msg = f"No model file or folder at {path}; pass {FILE_KINDS}, or a zoo name."
        raise FileNotFoundError(msg)
    else:
        names = ", ".join(sorted(ZOO))
        msg = f"Unknown model {spec!r}; zoo names are: {names}; or pass {FILE_KINDS}."
        raise ValueError(msg)
    return model.to(device).eval(), tok


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.startswith(".") or spec.endswith((".bin", ".gguf"))
