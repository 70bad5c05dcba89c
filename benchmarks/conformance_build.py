"""Small configs of transformers' causal LM classes for the conformance table, and why a class is left out.

``small_config(model_type, attn)`` shrinks any config to 2 layers, hidden 64, 4 heads, 2 KV heads and
vocab 128 (the keys in ``SMALL`` under every spelling transformers uses, then ``SPECIAL`` for the classes
that need a field of their own); ``build_small`` builds it seeded, float32, in eval mode, after checking
on the meta device that it really is small. A class that cannot take part raises ``Excluded`` with an
``Exclusion`` kind and one sentence; the table lists these rows with their reason.
"""

from __future__ import annotations

import contextlib
import enum
import re
from types import MappingProxyType
from typing import Any

import torch

from condfx.models_zoo.hf import CausalLMLogits

N_LAYERS = 2
MAX_PARAMS = 5_000_000  # a 2-layer, width-64 model has ~0.1M; more means a part was not shrunk
# Small sizes under every spelling transformers configs use; unknown keys are harmless attributes.
SMALL = MappingProxyType(dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
    n_embd=64, n_layer=N_LAYERS, n_head=4, n_positions=128, n_inner=128, ffn_dim=128, d_model=64,
    num_layers=N_LAYERS, num_heads=4, num_kv_heads=2, kv_channels=16, ffn_hidden_size=128,
    moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    n_group=1, topk_group=1,  # MoE expert groups: 4 experts cannot form the default 8 groups
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=64,
))
# Fields a class needs beyond SMALL for its small config to be valid (each line: why).
SPECIAL = MappingProxyType({
    "gptj": dict(rotary_dim=8),  # default 64 is wider than the 16-wide heads
    "codegen": dict(rotary_dim=8),
    "dots3_note": dict(num_key_value_heads=4),  # its validator wants MHA
    "dots3_note_text": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),  # "supports num_experts_per_tok=1 only"
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),  # one entry per layer
    "falcon": dict(head_dim=None),  # a read-only property computed from the width
    "reformer": dict(is_decoder=True, attn_layers=["local", "local"], axial_pos_embds_dim=[32, 32]),
    "xlnet": dict(max_position_embeddings=None),  # refuses a sequence length limit
    "mamba2": dict(num_heads=8),  # hidden * expand must equal heads * head_dim
    "gemma4_text": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # no default layer pattern
    # MLA: keys are expanded to every query head (no K/V groups), RoPE on qk_rope_head_dim (head_dim).
    **{t: dict(num_key_value_heads=4, head_dim=None) for t in (
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "axk1", "axk2", "glm4_moe_lite", "glm_moe_dsa",
        "longcat_flash", "sarvam_mla", "minicpm3", "hy_v4")},
    # Hybrids: one layer of each kind (their first layers are all Mamba / linear attention / conv).
    "bamba": dict(attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"], num_key_value_heads=4, head_dim=None),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"], num_key_value_heads=4,
                           head_dim=None),  # its attention layers are MLA too
    "lfm3": dict(layer_types=["conv", "full_attention"]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "nemotron_h": dict(hybrid_override_pattern="*-"),  # one mixer per layer: an attention and an MLP layer
})
_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# Sub-configs that make a class multimodal (a vision, audio or image-token tower).
_TOWERS = ("vision", "audio", "vq", "image", "speech")


class Exclusion(str, enum.Enum):
    """Why a transformers causal LM class has no measured row."""

    ENCODER_DECODER = "encoder-decoder"
    ENCODER_ONLY = "encoder-only"
    MULTIMODAL = "multimodal"
    NEEDS_PACKAGE = "needs a package"
    NO_SMALL_CONFIG = "fails to build from a small config"


class Excluded(Exception):  # noqa: N818 (a row outcome, raised to end the row)
    """A class left out of the table: ``kind`` (an ``Exclusion``) and the sentence why."""

    def __init__(self, kind: Exclusion, why: str) -> None:
        super().__init__(f"{kind.value}: {why}")
        self.kind = kind


def _sizes(model_type: str) -> dict[str, Any]:
    sizes = {**SMALL, **SPECIAL.get(model_type, {})}
    return {k: v for k, v in sizes.items() if v is not None}


def _for_model(model_type: str, sizes: dict[str, Any]):
    from transformers import AutoConfig

    for _ in range(8):  # drop the keys a config refuses (read-only properties such as Falcon's head_dim)
        try:
            return AutoConfig.for_model(model_type, **sizes)
        except AttributeError as err:
            refused = re.search(r"property '(\w+)'|set (\w+) with", str(err))
            if refused is None or (refused.group(1) or refused.group(2)) not in sizes:
                raise
            sizes.pop(refused.group(1) or refused.group(2))
    return AutoConfig.for_model(model_type, **sizes)


def small_config(model_type: str, attn: str):
    """The small config of ``model_type`` with ``attn`` implementation (raises when it cannot build)."""
    sizes = _sizes(model_type)
    config = _for_model(model_type, sizes)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in sizes.items():  # the text part of a multimodal config, and keys the init skipped
        with contextlib.suppress(Exception):
            if hasattr(text, key) and key not in _IDS:
                setattr(text, key, value)
    for key in _IDS:  # a text config's own special ids must lie inside the small vocabulary
        with contextlib.suppress(Exception):
            if (getattr(text, key, None) or 0) >= SMALL["vocab_size"]:
                setattr(text, key, SMALL[key])
    with contextlib.suppress(Exception):  # hybrids: one layer type per layer (some are read-only)
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = list(text.layer_types)[:N_LAYERS]
    config._attn_implementation = attn
    return config


def _exclusion_of(config) -> Excluded | None:
    from condfx.models_zoo.hf import decoder_refusal

    refusal = decoder_refusal(config)
    if refusal is None:
        return None
    kind = Exclusion.ENCODER_DECODER if "encoder-decoder" in refusal else Exclusion.ENCODER_ONLY
    kind = kind if "encoder" in refusal else Exclusion.NO_SMALL_CONFIG
    return Excluded(kind, f"not a decoder-only causal LM: {refusal}")


def _towers(config_or_type) -> list[str]:
    """The vision / audio sub-configs of a config (or of a model type's default config)."""
    config = config_or_type
    if isinstance(config_or_type, str):
        from transformers import AutoConfig

        try:
            config = AutoConfig.for_model(config_or_type)
        except Exception:  # noqa: BLE001
            return []
    return [k for k in getattr(config, "sub_configs", {}) if any(t in k for t in _TOWERS)]


def _check_size(config) -> None:
    """Builds ``config`` on the meta device and refuses it when it is not small."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in meta.parameters())
    if n <= MAX_PARAMS:
        return
    towers = _towers(config)
    if towers:
        why = f"its causal LM class also builds {', '.join(towers)} ({n / 1e6:.0f}M parameters small)"
        raise Excluded(Exclusion.MULTIMODAL, why)
    why = f"{n / 1e6:.0f}M parameters at the small sizes (a part the sweep does not shrink)"
    raise Excluded(Exclusion.NO_SMALL_CONFIG, why)


def build_small(model_type: str, attn: str, seed: int = 0) -> CausalLMLogits:
    """A seeded, float32, eval-mode small model of ``model_type`` wrapped to return logits.

    Raises:
        Excluded: the class is an encoder(-decoder), multimodal, needs a missing package, or its
            small config does not build.
    """
    from transformers import AutoModelForCausalLM

    try:
        config = small_config(model_type, attn)
    except Exception as err:  # noqa: BLE001 (any failure of a third-party config is the reason)
        kind = Exclusion.MULTIMODAL if _towers(model_type) else Exclusion.NO_SMALL_CONFIG
        raise Excluded(kind, first_sentence(err)) from err
    excluded = _exclusion_of(config)
    if excluded is not None:
        raise excluded
    try:
        _check_size(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except Excluded:
        raise
    except ImportError as err:
        raise Excluded(Exclusion.NEEDS_PACKAGE, first_sentence(err)) from err
    except Exception as err:  # noqa: BLE001
        if "scaled_dot_product_attention" in str(err) or "does not support" in str(err):
            raise  # SDPA not offered: the caller falls back to eager
        raise Excluded(Exclusion.NO_SMALL_CONFIG, first_sentence(err)) from err
    return CausalLMLogits(hf.float().eval(), model_type)


def first_sentence(err: BaseException) -> str:
    """The error's message on one line, without the pipeline's prefix, at most 160 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^pass '[^']*' failed \(passes run before it: [^)]*\): ", "", text)
    text = re.sub(r"^Class validation error for validator '\w+': ", "", text)
    return text[:160]
