"""Synthetic long-range recall tasks: multi-query associative recall (MQAR) and passkey retrieval.

MQAR follows Zoology (Arora et al., 2023): key-value pairs at the start, then queries of the keys
later in the sequence; the model must emit the value after each queried key. Passkey retrieval
(Mohtashami & Jaggi, 2023) hides a 5-digit key at a relative depth of a long background text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from condfx.eval.generate import greedy
from condfx.eval.perplexity import eval_mode, model_device, model_logits

__all__ = [
    "DEMO_MQAR",
    "DEMO_STEPS",
    "MQARConfig",
    "build_mqar_model",
    "make_mqar_batch",
    "make_passkey_prompt",
    "mqar_accuracy",
    "passkey_accuracy",
    "train_mqar_model",
]


@dataclass(frozen=True)
class MQARConfig:
    """Shape of an MQAR sequence.

    Token layout: ``filler_id`` (0) pads; keys come from ``[1, 1 + n_keys)`` and values from
    ``[1 + n_keys, vocab_size)``, with ``n_keys = (vocab_size - 1) // 2``, so the ranges are disjoint.
    A sequence is ``k1 v1 ... kN vN``, filler, and ``num_queries`` query keys at random even
    offsets (each followed by filler) that start at least ``gap`` tokens after the value of every
    pair; the model must predict the key's value at the query key's position.

    Attributes:
        vocab_size: total vocabulary (filler + keys + values).
        num_pairs: key-value pairs per sequence (distinct keys, distinct values).
        gap: minimum distance from a pair's value to the query of its key.
        seq_len: sequence length.
        num_queries: queries per sequence (distinct keys); default ``num_pairs``.
    """

    vocab_size: int = 64
    num_pairs: int = 8
    gap: int = 1
    seq_len: int = 64
    num_queries: int | None = None
    filler_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_pairs", "gap", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                msg = f"MQARConfig.{name} must be a positive int; got {value!r}"
                raise ValueError(msg)
        if self.num_pairs > self.n_keys or self.num_pairs > self.vocab_size - 1 - self.n_keys:
            msg = f"MQARConfig.num_pairs must be <= {self.n_keys} for vocab_size {self.vocab_size}; got {self.num_pairs}"
            raise ValueError(msg)
        if not 1 <= self.queries <= self.num_pairs:
            msg = f"MQARConfig.num_queries must be in [1, num_pairs={self.num_pairs}]; got {self.num_queries}"
            raise ValueError(msg)
        if self.query_start + 2 * self.queries > self.seq_len:
            need = self.query_start + 2 * self.queries
            msg = f"MQARConfig.seq_len must be >= {need} for these pairs, queries and gap; got {self.seq_len}"
            raise ValueError(msg)

    @property
    def n_keys(self) -> int:
        """Size of the key range."""
        return (self.vocab_size - 1) // 2

    @property
    def queries(self) -> int:
        """Queries per sequence."""
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def query_start(self) -> int:
        """First position a query key may take: the last value (at 2N - 1) plus ``gap``."""
        return max(2 * self.num_pairs, 2 * self.num_pairs - 1 + self.gap)


DEMO_MQAR = MQARConfig(vocab_size=32, num_pairs=4, seq_len=32)
"""The task of ``condfx demo``: 4 pairs of a 15-key, 16-value vocabulary, 32 tokens."""

DEMO_STEPS = 400
"""Training steps of the demo model (99 % after about 200 of them; the rest is margin)."""


def make_mqar_batch(
    cfg: MQARConfig, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws a batch of MQAR sequences.

    As in Zoology, the query section holds only the query keys (filler elsewhere): the queried
    value is a target, never an input. Putting the value after its query key would let a model
    reach ~50 % by eliminating the values already answered, a shortcut that stalls training.

    Args:
        cfg: the task shape.
        batch: number of sequences.
        generator: torch generator (the draw is deterministic given its state).

    Returns:
        ``(input_ids, targets)``, both (batch, seq_len) int64. ``targets[b, t]`` is the value that
        must follow the query key at ``input_ids[b, t]`` (targets are pre-shifted, as
        ``condfx.train.next_token_loss`` expects); -100 elsewhere.
    """
    n, q = cfg.num_pairs, cfg.queries
    n_values = cfg.vocab_size - 1 - cfg.n_keys
    n_slots = (cfg.seq_len - cfg.query_start) // 2
    keys = 1 + _sample(batch, cfg.n_keys, n, generator)  # (B, N)
    values = 1 + cfg.n_keys + _sample(batch, n_values, n, generator)  # (B, N)
    which = _sample(batch, n, q, generator)  # (B, Q) queried pairs
    slots = _sample(batch, n_slots, q, generator).sort(dim=1).values  # (B, Q)
    pos = cfg.query_start + 2 * slots  # (B, Q) positions of the query keys
    inputs = torch.full((batch, cfg.seq_len), cfg.filler_id, dtype=torch.long)
    targets = torch.full((batch, cfg.seq_len), -100, dtype=torch.long)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values
    inputs.scatter_(1, pos, keys.gather(1, which))
    targets.scatter_(1, pos, values.gather(1, which))
    return inputs, targets


def _sample(batch: int, population: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct draws from ``range(population)`` per row: (batch, k) int64."""
    return torch.rand(batch, population, generator=generator).argsort(dim=1)[:, :k]


def mqar_accuracy(
    model: nn.Module, cfg: MQARConfig, n: int = 256, seed: int = 0, batch_size: int = 64
) -> float:
    """Fraction of queried values that the model predicts by argmax at the query key.

    Args:
        model: ``forward(input_ids (B, T)) -> logits (B, T, V)``.
        cfg: the task shape.
        n: number of sequences.
        seed: seed of the evaluation draw.
        batch_size: sequences per forward.

    Returns:
        Accuracy in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    correct = total = 0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, n, batch_size):
            inputs, targets = make_mqar_batch(cfg, min(batch_size, n - start), generator)
            pred = model_logits(model, inputs.to(device)).argmax(-1).cpu()  # (B, T)
            mask = targets != -100
            correct += int((pred[mask] == targets[mask]).sum())
            total += int(mask.sum())
    return correct / total


def build_mqar_model(
    cfg: MQARConfig, seed: int = 0, *, dim: int = 64, n_layers: int = 2, n_heads: int = 2
) -> nn.Module:
    """Builds the untrained zoo Llama that :func:`train_mqar_model` trains (same shape and init).

    Args:
        cfg: the task shape; the model's vocabulary and max_seq_len follow it.
        seed: seeds the weights.
        dim, n_layers, n_heads: model shape (SwiGLU width ``2 * dim``, no GQA, untied head).

    Returns:
        A ``condfx.models_zoo.LlamaModel`` (train mode, as built).
    """
    from condfx.models_zoo import LlamaConfig, LlamaModel

    lcfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        hidden_dim=2 * dim,
        max_seq_len=cfg.seq_len,
    )
    return LlamaModel(lcfg, seed=seed, name="llama-mqar")


def train_mqar_model(
    cfg: MQARConfig,
    steps: int = DEMO_STEPS,
    seed: int = 0,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    progress: bool = False,
    save_to: str | Path | None = None,
) -> nn.Module:
    """Trains a tiny zoo Llama (2 layers, dim 64, 2 heads by default) on MQAR from scratch.

    With the defaults on :data:`DEMO_MQAR` it passes 99 % accuracy after about 200 steps
    (AdamW, fresh random batches every step, loss only at the query keys).

    Args:
        cfg: the task shape; the model's vocabulary and max_seq_len follow it.
        steps: optimizer steps.
        seed: seeds the weights and the data.
        lr: peak learning rate (cosine schedule to 10 %, 10 % linear warmup).
        batch_size: sequences per step.
        dim, n_layers, n_heads: model shape (see :func:`build_mqar_model`).
        progress: show a progress bar (on a terminal).
        save_to: also write the trained parameters to this safetensors file
            (reload them with ``condfx.train.load_trained`` into :func:`build_mqar_model`).

    Returns:
        The trained model (a ``condfx.models_zoo.LlamaModel``, eval mode).
    """
    from condfx.train import train

    model = build_mqar_model(cfg, seed, dim=dim, n_layers=n_layers, n_heads=n_heads)
    train(
        model,
        lambda step, gen: make_mqar_batch(cfg, batch_size, gen),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        warmup=max(1, steps // 10) if steps > 1 else 0,
        seed=seed,
        progress=progress,
        save_to=save_to,
    )
    return model.eval()


_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = " What is the pass key? The pass key is"


def make_passkey_prompt(
    tokenizer, background_text: str, passkey: int, n_tokens: int, depth: float
) -> list[int]:
    """Builds a passkey-retrieval prompt of about ``n_tokens`` tokens.

    The background is the first words of ``background_text`` that fit in ``n_tokens`` minus the
    needle and question; the needle "The pass key is NNNNN. Remember it. NNNNN is the pass key."
    goes at word boundary ``depth`` of it (0 = start, 1 = end); the prompt ends with "What is the
    pass key? The pass key is".

    Args:
        tokenizer: ``encode(text, bos=..., eos=...)``.
        background_text: filler text (the essays).
        passkey: the key, 0 <= passkey < 100000 (written with 5 digits).
        n_tokens: target prompt length in tokens (BOS included).
        depth: relative depth of the needle in [0, 1].

    Returns:
        The prompt ids (BOS first).

    Raises:
        ValueError: on a depth outside [0, 1], a passkey out of range, too small ``n_tokens``
            or too short a background.
    """
    if not 0.0 <= depth <= 1.0:
        msg = f"depth must be in [0, 1]; got {depth}"
        raise ValueError(msg)
    if not 0 <= passkey < 100000:
        msg = f"passkey must be in [0, 100000); got {passkey}"
        raise ValueError(msg)
    needle = _NEEDLE.format(key=f"{passkey:05d}")
    fixed = len(tokenizer.encode(needle + _QUESTION, bos=True, eos=False))
    budget = n_tokens - fixed
    if budget < 1:
        msg = f"n_tokens must exceed the {fixed} tokens of the needle and question; got {n_tokens}"
        raise ValueError(msg)
    words = _fit_words(tokenizer, background_text.split(), budget)
    cut = round(depth * len(words))
    text = " ".join(words[:cut]) + needle + " " + " ".join(words[cut:]) + _QUESTION
    return tokenizer.encode(text.strip(), bos=True, eos=False)


def _fit_words(tokenizer, words: list[str], budget: int) -> list[str]:
    """Returns the longest prefix of ``words`` whose encoding fits in ``budget`` tokens."""
    lo, hi = 0, min(len(words), budget)  # every word is at least one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), bos=False, eos=False)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    used = len(tokenizer.encode(" ".join(words[:lo]), bos=False, eos=False))
    if lo == len(words) and used < 0.9 * budget:
        msg = f"background_text is too short for n_tokens: it gives {used} of {budget} tokens"
        raise ValueError(msg)
    return words[:lo]


def passkey_accuracy(
    model: nn.Module,
    tokenizer,
    background_text: str,
    *,
    n_tokens: int,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    trials: int = 1,
) -> float:
    """Fraction of prompts whose greedy continuation starts with the right 5-digit key.

    Args:
        model: the language model.
        tokenizer: its tokenizer (``encode``, ``decode``).
        background_text: filler text.
        n_tokens: prompt length in tokens.
        depths: relative needle depths to try.
        seed: seeds the random passkeys.
        trials: prompts per depth.

    Returns:
        Accuracy in [0, 1].
    """
    rng = random.Random(seed)
    hits = total = 0
    for depth in depths:
        for _ in range(trials):
            key = rng.randrange(10000, 100000)
            ids = make_passkey_prompt(tokenizer, background_text, key, n_tokens, depth)
            out = greedy(model, None, ids, 8, max_seq_len=len(ids) + 8)
            digits = "".join(ch for ch in tokenizer.decode(out) if ch.isdigit())
            hits += digits[:5] == f"{key:05d}"
            total += 1
    return hits / total
