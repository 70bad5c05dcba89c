"""Hugging Face models: tiny test subjects, GGUF files and local folders, all behind one wrapper.

``CausalLMLogits`` gives every loaded transformers model the zoo contract
``forward(input_ids (B, T) int64) -> logits (B, T, V)``; the transformers model stays at ``.hf``.
transformers is imported only inside these functions, so importing the zoo stays fast.

Any decoder-only causal LM with attention heads that the installed transformers builds loads;
encoder-only and encoder-decoder models, architectures transformers does not know and files that
fail the checks of ``checks`` / ``gguf_checks`` are refused with one sentence (``LoadError``).

Does not handle: remote code (never trusted), downloads (``local_files_only=True``), pickle
weights (never unpickled: refused with a pointer to safetensors).
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import checks, gguf_checks
from .checks import LoadError
from .info import ModelInfo
from .llama import AttnImpl, parse_attn_impl
from .tokenizers import HFTokenizer

TINY_KINDS = ("llama", "qwen2", "qwen3", "gpt2")
"""The kinds ``build_hf`` builds: the architectures the zoo's tests cover end to end."""
# Mismatched shapes are reported (and refused by checks.check_loading_info), not raised mid-load.
_LOAD_OPTIONS = MappingProxyType(
    dict(dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
)
# Never a download, never remote code: every transformers call on a user file gets these.
_LOCAL = MappingProxyType(dict(local_files_only=True, trust_remote_code=False))
_DEFAULT_MAX_SEQ = 2048  # context assumed when a config states none
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
    """Summarise a transformers config (its text part, for multimodal ones) as a ``ModelInfo``."""
    text = _text_config(config)
    n_heads = text.num_attention_heads
    dim = text.hidden_size
    head_dim = _field(text, "head_dim") or dim // n_heads
    hidden = _field(text, "intermediate_size") or _field(text, "n_inner")
    # Models without learned positions (ALiBi: Bloom, MPT) may have no maximum in their config.
    max_seq = _field(text, "max_position_embeddings") or _field(text, "n_positions")
    return ModelInfo(
        name=name,
        family=config.model_type,
        n_layers=text.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=_field(text, "num_key_value_heads") or n_heads,
        head_dim=head_dim,
        dim=dim,
        hidden_dim=hidden or 4 * dim,
        vocab_size=text.vocab_size,
        max_seq_len=max_seq or _DEFAULT_MAX_SEQ,
    )


def _field(config: Any, name: str) -> Any:
    """``config.name``, or None when the config lacks it or refuses one global value (per-layer
    attributes of heterogeneous configs such as Gemma-4's head_dim raise their own error)."""
    try:
        value = getattr(config, name, None)
    except Exception:  # noqa: BLE001 (transformers' AmbiguousGlobalPerLayerAttributeError and kin)
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text_config(config: Any) -> Any:
    get_text = getattr(config, "get_text_config", None)
    return config if get_text is None else get_text()


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
        kind: one of ``TINY_KINDS`` (llama, qwen2, qwen3 with 2 KV heads; gpt2).
        attn_impl: ``"sdpa"`` or ``"eager"``.
        seed: init seed; the global RNG state is restored afterwards.

    Returns:
        The transformers model in eval mode, float32 (not wrapped).

    Raises:
        ValueError: unknown ``kind`` or ``attn_impl``.
    """
    if kind not in TINY_KINDS:
        msg = f"build_hf kind must be one of {set(TINY_KINDS)}; got {kind!r}."
        raise ValueError(msg)
    config = _tiny_config(kind, parse_attn_impl(attn_impl, "build_hf attn_impl"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(config)(config)
    return model.float().eval()


def load_gguf(
    path: str | Path, *, attn_impl: AttnImpl | str | None = None
) -> tuple[CausalLMLogits, HFTokenizer]:
    """Load a GGUF file through transformers (weights dequantized to float32), after checks.

    Args:
        path: the ``.gguf`` file.
        attn_impl: ``"sdpa"`` or ``"eager"``; ``None`` keeps transformers' default.

    Returns:
        ``(model, tokenizer)``, the model wrapped in ``CausalLMLogits`` and in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        LoadError: (a ``ValueError``) an unreadable file; metadata that is not positive or whose
            heads do not divide the width; an architecture transformers does not read from
            GGUF, or one that is not a decoder-only causal LM with attention; tensors whose
            layers or names disagree with the metadata; missing, misshapen or non-finite weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        msg = f"GGUF file {path} does not exist."
        raise FileNotFoundError(msg)
    reader = gguf_checks.read_gguf(path)
    arch = gguf_checks.architecture(reader, path)
    gguf_checks.check_metadata(reader, path, arch)
    folder, name, where = str(path.parent), path.name, f"GGUF file {path.name}"
    with _quiet_transformers():
        config = _gguf_config(
            path, arch, lambda: AutoConfig.from_pretrained(folder, gguf_file=name, **_LOCAL)
        )
        why = decoder_refusal(config)
        if why is not None:
            raise LoadError(_gguf_refusal(path, arch, why))
        gguf_checks.check_tensors(reader, path, arch)
        read_tokenizer = functools.partial(
            AutoTokenizer.from_pretrained, folder, gguf_file=name, **_LOCAL
        )
        tokenizer = _call(where, "read the tokenizer of", read_tokenizer)
        build = functools.partial(
            AutoModelForCausalLM.from_pretrained,
            folder, gguf_file=name, config=config, **_LOCAL, **_LOAD_OPTIONS,
            **_attn_kwargs(attn_impl),
        )
        # The GGUF conversion draws its own tqdm bar, out of reach of the switch above.
        with contextlib.redirect_stderr(io.StringIO()):
            hf, info = _call(where, "build a model from", build)
    checks.check_loading_info(info, where)
    checks.check_finite(hf, where)
    return CausalLMLogits(hf.eval(), path.stem).eval(), HFTokenizer(tokenizer)


def _gguf_config(path: Path, arch: str, read: Callable[[], Any]) -> Any:
    where = f"GGUF file {path.name}"
    try:
        return read()
    except ValueError as err:
        if "not supported" not in str(err):
            raise LoadError(_failure(where, "read the configuration of", err)) from err
        why = f"an architecture transformers {_tf_version()} does not read from GGUF"
        raise LoadError(_gguf_refusal(path, arch, why)) from err
    except Exception as err:  # third-party code on a user file: any failure is the file's
        raise LoadError(_failure(where, "read the configuration of", err)) from err


def _gguf_refusal(path: Path, arch: str, why: str) -> str:
    return (
        f"GGUF file {path.name} has architecture {arch!r}; supported architectures are "
        f"{', '.join(TINY_KINDS)} and any other decoder-only causal LM with attention that "
        f"transformers {_tf_version()} reads from GGUF, and this file holds {why}."
    )


def decoder_refusal(config: Any) -> str | None:
    """Why a transformers config is not a decoder-only causal LM with attention (``None``: it is).

    Args:
        config: a transformers ``PretrainedConfig``.

    Returns:
        A phrase such as ``"an encoder-only model"``, or ``None``.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return f"a {kind!r} model, an encoder-decoder model"
    # BERT-like models have a causal LM head class too, but only run causally when is_decoder.
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"a {kind!r} model, an encoder-only model"
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"a {kind!r} model, for which transformers {_tf_version()} has no causal LM class"
    if not getattr(_text_config(config), "num_attention_heads", None):
        return f"a {kind!r} model, a model without attention heads"
    return None


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
        LoadError: (a ``ValueError``) a bad config.json; a model type transformers does not
            know, or one that is not a decoder-only causal LM with attention; pickle-only
            weights; a corrupt or truncated safetensors file, an index shard outside the folder;
            non-float, missing, unexpected, misshapen or non-finite weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        msg = f"{path} is not a Hugging Face model folder: config.json is missing."
        raise FileNotFoundError(msg)
    where = f"Model folder {path}"
    with _quiet_transformers():
        config = _folder_config(path)
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            looked = ", ".join(_TOKENIZER_FILES)
            msg = f"{where} has no tokenizer files (looked for {looked})."
            raise FileNotFoundError(msg)
        for shard in checks.safetensors_files(path):
            checks.read_safetensors_header(shard)
        hf, info = _call(
            where,
            "build a model from",
            lambda: AutoModelForCausalLM.from_pretrained(
                path, config=config, use_safetensors=True, **_LOCAL, **_LOAD_OPTIONS,
                **_attn_kwargs(attn_impl),
            ),
        )
        tokenizer = _call(
            where, "read the tokenizer of", lambda: AutoTokenizer.from_pretrained(path, **_LOCAL)
        )
    checks.check_loading_info(info, where)
    checks.check_finite(hf, where)
    return CausalLMLogits(hf.eval(), path.name).eval(), HFTokenizer(tokenizer)


def _folder_config(path: Path) -> Any:
    """The transformers config of a folder whose config.json passed ``checks.read_config_json``,
    refused unless it is a decoder-only causal LM with attention."""
    from transformers import CONFIG_MAPPING, AutoConfig

    kind = checks.read_config_json(path)["model_type"]
    if kind not in CONFIG_MAPPING:
        msg = (
            f"{path / 'config.json'} has model_type {kind!r}, which transformers {_tf_version()} "
            "does not know (condfx never runs remote code)."
        )
        raise LoadError(msg)
    read = functools.partial(AutoConfig.from_pretrained, path, **_LOCAL)
    config = _call(str(path / "config.json"), "build a configuration from", read)
    why = decoder_refusal(config)
    if why is not None:
        msg = f"Model folder {path} holds {why}; condfx needs a decoder-only causal LM."
        raise LoadError(msg)
    return config


def _call(where: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run a transformers call on a user file; any failure becomes one sentence naming it."""
    try:
        return fn()
    except LoadError:
        raise
    except Exception as err:  # third-party code on a user file: any failure is the file's
        raise LoadError(_failure(where, what, err)) from err


def _failure(where: str, what: str, err: BaseException) -> str:
    # Multi-line messages (e.g. transformers' config validators) are joined into one line.
    detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    detail = (detail[:300] + " ...") if len(detail) > 300 else detail.rstrip(".")
    detail = detail or type(err).__name__
    return f"transformers could not {what} {where}: {detail}."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (condfx reports problems itself)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _attn_kwargs(attn_impl: AttnImpl | str | None) -> dict[str, str]:
    if attn_impl is None:
        return {}
    return {"attn_implementation": parse_attn_impl(attn_impl).value}
