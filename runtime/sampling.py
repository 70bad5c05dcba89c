"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator.

``SamplingConfig.from_options(**options)`` is the one place user options are checked: an unknown
option or a bad value raises ``ValueError`` naming it and what is allowed.

Each prompt samples from its own generator (``prompt_generator(config, i)``: prompt 0 from ``seed``
itself, prompt i > 0 from a SHA256 of (seed, i)), so a prompt's tokens do not depend on which other
prompts share its batch. Seeds are ints in [0, 2**63 - 1]; others are refused rather than reduced,
so two different seeds never silently give the same stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from condfx.options import BIG_INT, Bool, Float, Int, check_options

MAX_TEMPERATURE = 1000.0
"""Above this the distribution is uniform to float precision: a larger value is a typo."""


_BOUNDS = MappingProxyType({
    "greedy": Bool(),
    "temperature": Float(0.0, MAX_TEMPERATURE),
    "top_k": Int(0, BIG_INT),
    "top_p": Float(0.0, 1.0, low_open=True, noun="", full_range=True),
})
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64); condfx keeps it non-negative


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        greedy: take the argmax; the other options are then ignored. Also implied by
            ``temperature == 0``.
        temperature: logits are divided by it before softmax; a finite number in [0, 1000].
        top_k: keep the k most likely tokens; 0 keeps all. Must be >= 0.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling); must be in (0, 1], 1 keeps all.
        seed: seed of the generators, so a run is reproducible; an int in [0, 2**63 - 1].
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_options(self, _BOUNDS, owner="sampling option ")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            msg = f"sampling option seed must be an int in [0, 2**63 - 1]; got {self.seed!r}."
            raise ValueError(msg)

    @classmethod
    def from_options(cls, **options: Any) -> SamplingConfig:
        """Builds a config from keyword options, rejecting unknown names.

        Decoding is greedy unless a sampling option (temperature, top_k, top_p) is given or
        ``greedy=False`` is asked for, as in Hugging Face's ``generate``.

        Raises:
            ValueError: an unknown option (the message lists the allowed ones) or a bad value.
        """
        allowed = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in allowed:
                msg = f"Unknown sampling option '{name}'; allowed options: {', '.join(allowed)}."
                raise ValueError(msg)
        if "greedy" not in options:
            options["greedy"] = not ({"temperature", "top_k", "top_p"} & options.keys())
        return cls(**options)

    @property
    def is_greedy(self) -> bool:
        """True when the choice is deterministic argmax."""
        return self.greedy or self.temperature == 0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sets logits outside the top-k and top-p sets to -inf.

    Args:
        logits: (B, V) scores.
        top_k: keep the k largest per row; 0 keeps all.
        top_p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.

    Returns:
        (B, V) filtered logits; at least one token per row stays finite.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p  # the first token always has before == 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generator(config: SamplingConfig, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from ``config.seed`` (the generator of prompt 0)."""
    return prompt_generator(config, 0, device)


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``: ``seed`` for prompt 0, else 63 bits of a SHA256 of (seed, index)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"condfx-sampling:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prompt_generator(
    config: SamplingConfig, index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator prompt ``index`` samples from, seeded by ``prompt_seed(config.seed, index)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(prompt_seed(config.seed, index))
    return gen


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, where: str) -> None:
    """ValueError naming the first id outside ``[0, vocab_size)``; nothing when the vocab is unknown."""
    if vocab_size is None or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        first = int(ids[bad][0])
        msg = f"{where}: token id {first} is outside the vocabulary [0, {vocab_size - 1}]."
        raise ValueError(msg)


def sample_next(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Chooses one token per row.

    Args:
        logits: (B, V) scores of the next position.
        config: the sampling options.
        generator: one seeded generator for every row (``make_generator``), or one per row
            (``prompt_generator``: each row's tokens then depend on that row only); ignored when
            greedy.

    Returns:
        (B,) int64 token ids.
    """
    if config.is_greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / config.temperature
    probs = torch.softmax(filter_logits(scaled, config.top_k, config.top_p), dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.shape[0]:
        msg = f"sample_next needs one generator per row: {probs.shape[0]} rows, {len(generator)} generators."
        raise ValueError(msg)
    rows = [torch.multinomial(p.to(g.device), 1, generator=g) for p, g in zip(probs, generator, strict=True)]
    return torch.cat(rows).to(device=logits.device, dtype=torch.long)
