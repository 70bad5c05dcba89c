"""condfx.models_zoo: reference models, loaders (llama2.c, GGUF, Hugging Face folders), tokenizers.

``load(spec)`` takes a zoo name (see ``ZOO``) or a path and returns ``(model, tokenizer)``; every
model has ``forward(input_ids (B, T) int64) -> logits (B, T, V)`` and ``model.info``
(a ``ModelInfo``).
A file or folder that is refused raises ``LoadError`` (a ``ValueError``), one sentence naming it.
Importing this package does not import transformers.
"""

from .checks import LoadError
from .gpt2 import GPT2Config, GPT2Model
from .hf import CausalLMLogits, build_hf, load_gguf, load_hf_folder
from .info import ModelInfo
from .llama import AttnImpl, LlamaConfig, LlamaModel
from .llama2c import load_llama2c
from .tokenizers import ByteTokenizer, HFTokenizer, Llama2cTokenizer, Tokenizer
from .zoo import META_ONLY, ZOO, build_zoo, load

__all__ = [
    "META_ONLY",
    "ZOO",
    "AttnImpl",
    "ByteTokenizer",
    "CausalLMLogits",
    "GPT2Config",
    "GPT2Model",
    "HFTokenizer",
    "Llama2cTokenizer",
    "LlamaConfig",
    "LlamaModel",
    "LoadError",
    "ModelInfo",
    "Tokenizer",
    "build_hf",
    "build_zoo",
    "load",
    "load_gguf",
    "load_hf_folder",
    "load_llama2c",
]
