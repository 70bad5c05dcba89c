"""Greedy decoding without a cache: the reference loop that the cached runtime is checked against.

Every step re-runs the full forward over the (left-truncated) sequence, so this is O(T^2) and only
meant for tests, evaluation of short continuations and demos.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from condfx.eval.perplexity import eval_mode, model_device, model_logits

__all__ = ["generate_text", "greedy"]


def _max_seq_len(model: nn.Module, max_seq_len: int | None) -> int | None:
    if max_seq_len is not None:
        return int(max_seq_len)
    return getattr(getattr(model, "info", None), "max_seq_len", None)


def greedy(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    stop_ids: Iterable[int] = (),
    max_seq_len: int | None = None,
) -> list[int]:
    """Greedy (argmax) continuation of ``prompt_ids``.

    Args:
        model: module with ``forward(input_ids (1, T)) -> logits (1, T, V)``.
        tokenizer: unused except that, when given and ``stop_ids`` is empty, its ``eos_id`` stops
            generation; may be None.
        prompt_ids: the prompt, at least one token.
        max_new_tokens: how many tokens to generate at most (0 returns ``[]``).
        stop_ids: token ids that end generation; the stop token is included in the result.
        max_seq_len: longest sequence the model sees; default ``model.info.max_seq_len`` (no limit
            when neither is known). Longer sequences are cut from the left.

    Returns:
        The generated ids only (not the prompt).

    Raises:
        ValueError: on an empty prompt or negative ``max_new_tokens``.
    """
    if len(prompt_ids) == 0:
        msg = "prompt_ids must hold at least one token; got an empty prompt"
        raise ValueError(msg)
    if max_new_tokens < 0:
        msg = f"max_new_tokens must be >= 0; got {max_new_tokens}"
        raise ValueError(msg)
    stops = set(stop_ids)
    if not stops and tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        stops = {tokenizer.eos_id}
    limit = _max_seq_len(model, max_seq_len)
    ids = [int(i) for i in prompt_ids]
    out: list[int] = []
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        for _ in range(max_new_tokens):
            window = ids[-limit:] if limit else ids
            x = torch.tensor([window], dtype=torch.long, device=device)  # (1, T)
            nxt = int(model_logits(model, x)[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
            if nxt in stops:
                break
    return out


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of a text prompt (BOS prepended); returns the decoded new text only."""
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    return tokenizer.decode(greedy(model, tokenizer, ids, max_new_tokens))
