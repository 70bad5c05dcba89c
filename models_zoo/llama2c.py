"""Loader for legacy (version 0) llama2.c checkpoints, e.g. ``stories260K.bin``.

Format (see ``shared/data/README.md``): 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; a negative vocab_size means an unshared classifier), then float32
arrays: token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
freq_cis_imag, [classifier]. llama2.c applies RoPE to interleaved pairs; ``wq``/``wk`` are
un-permuted here so the model runs with half-split ("rotate_half") RoPE. Weights are read with
numpy, never unpickled. The header is checked against the file size and against the stored RoPE
tables (which fix head_dim and seq_len), and every value must be finite.

Does not handle: the versioned llama2.c exports (magic ``ak42``, versions 1 and 2, int8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checks import LoadError
from .llama import AttnImpl, LlamaConfig, LlamaModel, parse_attn_impl
from .tokenizers import Llama2cTokenizer

HEADER_INTS = 7
_MAGIC_AK42 = 0x616B3432  # versioned exports start with this magic


def _read_header(path: Path) -> tuple[int, ...]:
    if path.stat().st_size < 4 * HEADER_INTS:
        msg = (
            f"llama2.c checkpoint {path} is truncated: expected at least {4 * HEADER_INTS} bytes "
            f"of header, the file has {path.stat().st_size}."
        )
        raise ValueError(msg)
    header = tuple(int(v) for v in np.fromfile(path, dtype="<i4", count=HEADER_INTS))
    if header[0] == _MAGIC_AK42:
        msg = (
            f"{path} is a versioned llama2.c export (magic 'ak42'); "
            "only legacy version-0 files are supported."
        )
        raise ValueError(msg)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = header
    if min(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq) <= 0:
        msg = (
            f"{path} is not a llama2.c version-0 checkpoint: "
            f"its header {header} has non-positive sizes."
        )
        raise ValueError(msg)
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        msg = (
            f"{path} has an inconsistent header {header}: n_heads must divide dim into an even "
            "head_dim and n_kv_heads must divide n_heads."
        )
        raise ValueError(msg)
    return header


def _layout(cfg: LlamaConfig, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the float32 arrays, in file order."""
    d, h, n, v, hd = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    kv = cfg.n_kv_heads * hd
    layout = [
        ("token_embedding", (v, d)),
        ("rms_att", (n, d)),
        ("wq", (n, cfg.n_heads * hd, d)),
        ("wk", (n, kv, d)),
        ("wv", (n, kv, d)),
        ("wo", (n, d, cfg.n_heads * hd)),
        ("rms_ffn", (n, d)),
        ("w1", (n, h, d)),
        ("w2", (n, d, h)),
        ("w3", (n, h, d)),
        ("rms_final", (d,)),
        ("freq_cis_real", (cfg.max_seq_len * hd // 2,)),
        ("freq_cis_imag", (cfg.max_seq_len * hd // 2,)),
    ]
    if not shared:
        layout.append(("classifier", (v, d)))
    return layout


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE to half-split RoPE.

    Args:
        w: weight of shape (n_heads * head_dim, dim).
        n_heads: heads in ``w`` (query heads for wq, KV heads for wk).

    Returns:
        The weight with rows ordered per head as (all even, all odd) pair members.
    """
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)  # (H*D, C)


def _read_arrays(path: Path, cfg: LlamaConfig, shared: bool) -> dict[str, torch.Tensor]:
    layout = _layout(cfg, shared)
    n_floats = sum(int(np.prod(shape)) for _, shape in layout)
    expected = 4 * HEADER_INTS + 4 * n_floats
    actual = path.stat().st_size
    if actual != expected:
        kind = "truncated" if actual < expected else "longer than its header implies"
        msg = (
            f"llama2.c checkpoint {path} is {kind}: its header implies {expected} bytes, "
            f"the file has {actual}."
        )
        raise ValueError(msg)
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=4 * HEADER_INTS))
    arrays, off = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        arrays[name] = flat[off : off + size].view(shape)
        off += size
    for name, array in arrays.items():
        if not bool(torch.isfinite(array).all()):
            msg = f"llama2.c checkpoint {path} has NaN or infinite values in {name}."
            raise LoadError(msg)
    _check_rope_tables(path, arrays, cfg)
    return arrays


def _check_rope_tables(path: Path, arrays: dict[str, torch.Tensor], cfg: LlamaConfig) -> None:
    """Refuse a header whose head_dim or seq_len disagree with the stored RoPE tables.

    The tables are cos/sin(t * 10000^(-2i/head_dim)) for t < seq_len, i < head_dim/2, so they
    pin both sizes: a header altered to another shape of the same file size is caught here.
    """
    seq, hd = cfg.max_seq_len, cfg.head_dim
    freqs = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)  # (seq, hd/2)
    for name, expected in (("freq_cis_real", angles.cos()), ("freq_cis_imag", angles.sin())):
        stored = arrays[name].view(seq, hd // 2).double()
        if not torch.allclose(stored, expected, rtol=0.0, atol=1e-3):
            msg = (
                f"llama2.c checkpoint {path} has a header (head_dim {hd}, seq_len {seq}) that "
                f"disagrees with its stored RoPE table {name}; the header or the file is altered."
            )
            raise LoadError(msg)


def _state_dict(arrays: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    sd = {
        "tok_embeddings.weight": arrays["token_embedding"],
        "norm.weight": arrays["rms_final"],
        "output.weight": arrays.get("classifier", arrays["token_embedding"]),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        sd[p + "attention_norm.weight"] = arrays["rms_att"][i]
        sd[p + "attention.wq.weight"] = unpermute_rope(arrays["wq"][i], cfg.n_heads)
        sd[p + "attention.wk.weight"] = unpermute_rope(arrays["wk"][i], cfg.n_kv_heads)
        sd[p + "attention.wv.weight"] = arrays["wv"][i]
        sd[p + "attention.wo.weight"] = arrays["wo"][i]
        sd[p + "ffn_norm.weight"] = arrays["rms_ffn"][i]
        for w in ("w1", "w2", "w3"):
            sd[p + f"feed_forward.{w}.weight"] = arrays[w][i]
    return sd


def load_llama2c(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    attn_impl: AttnImpl | str = AttnImpl.SDPA,
) -> tuple[LlamaModel, Llama2cTokenizer]:
    """Load a legacy llama2.c checkpoint as a half-split-RoPE ``LlamaModel`` in eval mode.

    Args:
        path: the ``.bin`` checkpoint.
        tokenizer_path: the llama2.c tokenizer; default ``tok<vocab_size>.bin`` next to the
            checkpoint, else ``tokenizer.bin`` there.
        attn_impl: ``"sdpa"`` (default) or ``"eager"``.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: the checkpoint or tokenizer does not exist.
        ValueError: the file is truncated, corrupt, a versioned export, its header disagrees
            with its size or its stored RoPE tables, it holds NaN or infinite values, or the
            tokenizer's vocabulary does not match.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"llama2.c checkpoint {path} does not exist."
        raise FileNotFoundError(msg)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _read_header(path)
    cfg = LlamaConfig(
        vocab_size=abs(vocab),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        hidden_dim=hidden,
        max_seq_len=seq,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=vocab > 0,
        attn_impl=parse_attn_impl(attn_impl),
    )
    state = _state_dict(_read_arrays(path, cfg, shared=vocab > 0), cfg)
    tokenizer = Llama2cTokenizer.from_file(_tokenizer_path(path, tokenizer_path, cfg.vocab_size))
    if tokenizer.vocab_size != cfg.vocab_size:
        msg = (
            f"Tokenizer has {tokenizer.vocab_size} tokens but checkpoint {path} has a vocabulary "
            f"of {cfg.vocab_size}; pass the matching tokenizer_path."
        )
        raise ValueError(msg)
    # Built on CPU rather than meta: meta init pulls in torch._refs (~2 s on first use).
    model = LlamaModel(cfg, name=path.stem)
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer


def _tokenizer_path(path: Path, given: str | Path | None, vocab_size: int) -> Path:
    if given is not None:
        return Path(given)
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin"):
        candidate = path.parent / name
        if candidate.is_file():
            return candidate
    msg = (
        f"No tokenizer found next to {path} (looked for tok{vocab_size}.bin and tokenizer.bin); "
        "pass tokenizer_path."
    )
    raise FileNotFoundError(msg)
