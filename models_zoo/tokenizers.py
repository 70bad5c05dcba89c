"""Tokenizers behind one protocol: llama2.c's BPE, a Hugging Face wrapper, a byte tokenizer.

``Llama2cTokenizer`` reproduces llama2.c ``run.c`` exactly: a dummy space prefix, UTF-8 code points
looked up whole or byte-fallback to ``<0xNN>`` (ids 3..258), then repeatedly merge the adjacent
pair whose concatenation is in the vocabulary with the highest score.
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


@runtime_checkable
class Tokenizer(Protocol):
    """What every zoo tokenizer offers."""

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Llama2cTokenizer:
    """The llama2.c tokenizer (``tok512.bin`` format): SentencePiece-style BPE by piece scores.

    Args:
        pieces: the byte string of each token, indexed by id.
        scores: the merge score of each token.
        max_token_length: the longest piece, as stored in the file.
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int) -> None:
        if len(pieces) != len(scores):
            msg = (
                "Llama2cTokenizer needs one score per piece; "
                f"got {len(pieces)} pieces and {len(scores)} scores."
            )
            raise ValueError(msg)
        self.pieces = pieces
        self.scores = scores
        self.max_token_length = max_token_length
        self._lookup: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._lookup.setdefault(
                piece, i
            )  # first id wins, like llama2.c's sorted bsearch on ties

    @classmethod
    def from_file(cls, path: str | Path, vocab_size: int | None = None) -> Llama2cTokenizer:
        """Read a llama2.c tokenizer file.

        Args:
            path: the ``.bin`` tokenizer file (int32 max_token_length, then per token: float32
                score, int32 length, bytes).
            vocab_size: number of tokens to read; ``None`` reads to the end of the file.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is truncated or malformed.
        """
        path = Path(path)
        if not path.is_file():
            msg = f"Tokenizer file {path} does not exist."
            raise FileNotFoundError(msg)
        data = path.read_bytes()
        if len(data) < 4:
            msg = (
                f"Tokenizer file {path} is too short ({len(data)} bytes) for a llama2.c tokenizer."
            )
            raise ValueError(msg)
        (max_len,) = struct.unpack_from("<i", data, 0)
        pieces, scores, off = [], [], 4
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if off + 8 > len(data):
                break
            score, n = struct.unpack_from("<fi", data, off)
            if n < 0 or off + 8 + n > len(data):
                break
            pieces.append(data[off + 8 : off + 8 + n])
            scores.append(score)
            off += 8 + n
        complete = off == len(data) if vocab_size is None else len(pieces) == vocab_size
        if not complete:
            msg = (
                f"Tokenizer file {path} is truncated or malformed: read {len(pieces)} tokens, "
                f"stopped at byte {off} of {len(data)}."
            )
            raise ValueError(msg)
        return cls(pieces, scores, max_len)

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.pieces)

    def _initial_ids(self, text: str) -> list[int]:
        """Ids of each UTF-8 code point (or its bytes, + 3) after the dummy-space prefix."""
        ids = []
        if text:
            space = self._lookup.get(b" ")
            ids.append(space if space is not None else ord(" ") + 3)
        for ch in text:
            raw = ch.encode("utf-8", errors="surrogatepass")
            tid = self._lookup.get(raw)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(b + 3 for b in raw)  # byte fallback: <0xNN> is id NN + 3
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` exactly as llama2.c's ``encode()``.

        Args:
            text: the string to encode.
            bos: prepend BOS (id 1).
            eos: append EOS (id 2).

        Returns:
            The token ids.
        """
        ids = self._merge(([self.bos_id] if bos else []) + self._initial_ids(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply llama2.c's merge loop in O(n log n): the best-scoring adjacent pair first, the
        leftmost on ties (a heap keyed by (-score, position) over a linked list, stale entries
        skipped), which picks the same pair as run.c's quadratic scan at every step."""
        n = len(ids)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j == -1:
                return
            tid = self._lookup.get(self.pieces[ids[i]] + self.pieces[ids[j]])
            if tid is not None and self.scores[tid] > -1e10:
                heapq.heappush(heap, (-self.scores[tid], i, ids[i], ids[j], tid))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, tid = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j == -1 or ids[i] != left or ids[j] != right:
                continue  # stale: this pair no longer exists
            ids[i], alive[j], nxt[i] = tid, False, nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            if prv[i] != -1:
                push(prv[i])
            push(i)
        return [t for t, a in zip(ids, alive, strict=True) if a]

    def decode(self, ids: list[int]) -> str:
        """Decode ids as llama2.c prints them: BOS/EOS dropped, the leading space after BOS (or at
        the start) stripped, ``<0xNN>`` pieces mapped to their byte."""
        out, prev = bytearray(), self.bos_id
        for tid in ids:
            tid = int(tid)
            if tid in (self.bos_id, self.eos_id):
                prev = tid
                continue
            piece = self.pieces[tid]
            if prev == self.bos_id and piece.startswith(b" "):
                piece = piece[1:]
            match = _BYTE_PIECE.match(piece)
            out += bytes([int(match.group(1), 16)]) if match else piece
            prev = tid
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the zoo ``Tokenizer`` protocol.

    ``encode(text, bos=True)`` prepends BOS only when the model was trained with one, i.e. when
    the tokenizer's own ``encode`` adds it (Llama does, SmolLM2 and GPT-2 do not), so the default
    call matches what the model expects.

    Args:
        tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``).
        add_bos: whether ``bos=True`` prepends BOS; ``None`` detects it from the tokenizer.
    """

    def __init__(self, tokenizer: Any, add_bos: bool | None = None) -> None:
        self.hf = tokenizer
        if add_bos is None:
            bos = tokenizer.bos_token_id
            add_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [
                bos
            ]
        self.add_bos = add_bos

    @property
    def bos_id(self) -> int | None:
        """BOS id, or ``None`` when the tokenizer has none."""
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        """EOS id, or ``None`` when the tokenizer has none."""
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return len(self.hf)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` without the tokenizer's own special tokens, then add BOS (if asked and
        the model uses one, see the class docstring) and EOS (if asked and defined)."""
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Decode ids, dropping special tokens."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


class ByteTokenizer:
    """Bytes as tokens for zoo models with no real vocabulary: UTF-8 byte ``b`` is id ``b``.

    BOS and EOS are the ASCII control bytes STX (2) and ETX (3) so that everything fits in a
    256-token vocabulary; ``decode`` drops them.
    """

    bos_id = 2
    eos_id = 3
    vocab_size = 256

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` as its UTF-8 bytes, with optional BOS/EOS."""
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Decode byte ids (BOS/EOS dropped; invalid UTF-8 replaced)."""
        raw = bytes(int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id))
        return raw.decode("utf-8", errors="replace")
