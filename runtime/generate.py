"""``generate()``: the decoding loop over a ``Session``, with streaming and mixed-length batches.

Prompts of different lengths: ``condfx.attention`` has no padding mask, so a padded batch would
attend to pad tokens. ``generate`` therefore groups prompts by length: prompts of equal length run
as one batch, and the groups run one after another (correct first; a padded, masked batch is a later
optimisation). Rows that stop early (a stop id) are dropped from the batch and from the caches
(``Session.reorder``), so finished rows cost nothing.

Sampling: each prompt has its own generator (``sampling.prompt_generator``, seeded from the seed and
the prompt's index), so a prompt's sampled tokens are the same alone or in any batch.

The no-cache baseline the cached loop must match token for token is ``condfx.eval.greedy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from condfx.runtime.sampling import SamplingConfig, prompt_generator, sample_next
from condfx.runtime.session import Session

StreamCallback = Callable[[int, int], None]


def _encode(prompts: Sequence[Any], tokenizer: Any) -> list[list[int]]:
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        msg = "generate() needs a non-empty list of prompts (each a string or a list of token ids)."
        raise ValueError(msg)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                msg = f"generate(): prompt {i} is a string; pass tokenizer= to encode it."
                raise ValueError(msg)
            p = tokenizer.encode(p, bos=True)
        ids = [int(t) for t in p]
        if not ids:
            msg = f"generate(): prompt {i} is empty; every prompt needs at least one token."
            raise ValueError(msg)
        out.append(ids)
    return out


def _check_lengths(ids: list[list[int]], limit: int | None, max_new_tokens: Any) -> None:
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        msg = f"generate(): max_new_tokens must be an int >= 0; got {max_new_tokens!r}."
        raise ValueError(msg)
    for i, p in enumerate(ids):
        if limit is not None and len(p) > limit:
            msg = f"generate(): prompt {i} has {len(p)} tokens, more than the model's context of {limit}."
            raise ValueError(msg)


def _check_vocab(ids: list[list[int]], vocab: int | None) -> None:
    """Every prompt before any runs, so a bad id in the last prompt wastes no work."""
    for i, p in enumerate(ids):
        bad = next((t for t in p if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            allowed = f"[0, {vocab - 1}]" if vocab is not None else "[0, vocab_size)"
            msg = f"generate(): prompt {i}: token id {bad} is outside the vocabulary {allowed}."
            raise ValueError(msg)


def _group_by_length(ids: list[list[int]]) -> list[list[int]]:
    """Indices of equal-length prompts, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(ids):
        groups.setdefault(len(p), []).append(i)
    return list(groups.values())


def _run_group(session, rows, prompts, out, max_new_tokens, config, gens, stop, stream) -> None:
    """Decodes one group of equal-length prompts; appends new tokens to ``out[row]``.

    ``gens[row]`` is prompt ``row``'s generator (None when greedy)."""
    batch = torch.tensor([prompts[r] for r in rows], dtype=torch.long)  # (B, T)
    logits = session.prefill(batch)[:, -1]  # (B, V)
    limit = session.max_seq_len
    for n in range(max_new_tokens):
        if limit is not None and session.position >= limit:
            return  # prompt + new tokens never exceed the model's context
        tokens = sample_next(logits, config, None if config.is_greedy else [gens[r] for r in rows])
        keep = []
        for j, (row, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            out[row].append(tok)
            if stream is not None:
                stream(row, tok)
            if tok not in stop:
                keep.append(j)
        at_limit = limit is not None and session.position + 1 >= limit
        if not keep or n == max_new_tokens - 1 or at_limit:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long)
            session.reorder(index)
            rows, tokens = [rows[j] for j in keep], tokens[index]
        logits = session.step(tokens.unsqueeze(1).to(torch.long))[:, -1]  # (B, V)


def generate(
    session: Session,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = (),
    stream: StreamCallback | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """Generates continuations of ``prompts`` with the session's caches.

    Args:
        session: the ``Session`` to run.
        prompts: token-id lists, or strings (then ``tokenizer`` encodes them with BOS).
        tokenizer: a condfx tokenizer (``encode(text, bos=True)``), needed for string prompts.
        max_new_tokens: most tokens generated per prompt. Generation also stops when prompt plus
            new tokens reach the model's context (``session.max_seq_len``).
        stop_ids: token ids that end a row; the stop id is kept as the row's last token.
        stream: called as ``stream(prompt_index, token_id)`` once per generated token, in order.
        **sampling: ``SamplingConfig`` options: greedy, temperature, top_k, top_p, seed.

    Returns:
        One list of new token ids per prompt, in the prompts' order.

    Raises:
        ValueError: an unknown sampling option or bad value, an empty or too long prompt, a token
            id outside the vocabulary, a string prompt without tokenizer, or a bad ``max_new_tokens``.
    """
    config = SamplingConfig.from_options(**sampling)
    ids = _encode(prompts, tokenizer)
    _check_lengths(ids, session.max_seq_len, max_new_tokens)
    out: list[list[int]] = [[] for _ in ids]
    if max_new_tokens == 0:
        return out
    _check_vocab(ids, getattr(session, "vocab_size", None))
    gens = [None if config.is_greedy else prompt_generator(config, i) for i in range(len(ids))]
    stop = frozenset(int(s) for s in stop_ids)
    for rows in _group_by_length(ids):
        _run_group(session, rows, ids, out, max_new_tokens, config, gens, stop, stream)
    return out
