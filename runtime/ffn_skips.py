"""Counting the FFN rows a ``skip-ffn`` model skips while it runs (the measured skip fraction).

The policy state itself needs no runtime cache: the per-sequence step counter is the graph's position
``arange``, which ``add-kv-cache`` offsets by the cache length, and the per-token skip countdown
(similarity policy) or router decision (forecast policy) is computed layer by layer inside the graph
from the current token's own hidden state. What the runtime adds is the measurement:
``FFNSkipCounter`` observes every eager ``condfx.masked_ffn`` call (the PyTorch backend) and counts
executed and skipped rows. The ONNX backend runs the masks inside ONNX Runtime, where they are not
observable; ``Session.count_ffn_skips`` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from condfx.ops.masked_ffn import add_row_observer, remove_row_observer


@dataclass
class FFNSkipCounter:
    """Context manager: counts rows of ``condfx.masked_ffn`` calls run while it is open.

    Attributes:
        ffn_layers: FFN layers of the model (cold ones included), for ``fraction_of_all_ffn``.
        masked_layers: FFN layers rewritten to ``condfx.masked_ffn``.
        executed, rows: rows executed / seen over all masked FFN calls so far.
    """

    ffn_layers: int
    masked_layers: int
    executed: int = 0
    rows: int = 0

    def _observe(self, executed: int, rows: int) -> None:
        self.executed += executed
        self.rows += rows

    def __enter__(self) -> FFNSkipCounter:
        add_row_observer(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        remove_row_observer(self._observe)

    @property
    def skipped(self) -> int:
        """Rows routed out (not executed) by the masked FFNs."""
        return self.rows - self.executed

    @property
    def fraction(self) -> float:
        """Skipped rows / rows of the masked FFNs."""
        return self.skipped / self.rows if self.rows else 0.0

    @property
    def fraction_of_all_ffn(self) -> float:
        """Skipped rows / (tokens x every FFN layer): the fraction of all FFN blocks not run."""
        if not self.rows or not self.masked_layers:
            return 0.0
        tokens = self.rows / self.masked_layers
        return self.skipped / (tokens * self.ffn_layers)
