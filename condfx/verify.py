"""Compare a model before and after a rewrite: ``condfx.verify(before, after, inputs)``.

Exact rewrites must agree within the dtype tolerance of ``EXACT_TOLERANCES`` (max abs diff <= atol +
rtol * max|before|). Lossy rewrites report their metrics and pass when the SQNR is above a floor;
with ``sqnr_floor_db=None`` a lossy check is "measured, no tolerance": it fails only when the
outputs are not finite. Metrics: max and mean abs diff, SQNR in dB, KL(softmax(before) ||
softmax(after)) over the last dim averaged over positions, and top-1 (argmax over the last dim)
agreement.

Verification acts: ``VerifyResult.raise_if_failed`` and ``check_export_diffs`` raise
``VerificationError`` (a ValueError: the CLI's exit 2) with one sentence giving the figure and the
tolerance. The tolerances and why:

- exact pipelines (``condfx optimize`` with exact passes only, ``apply(verify_inputs=...)`` while
  only exact passes ran): ``EXACT_TOLERANCES`` (float32: 1e-5 + 1e-5 * max|logit|, 1.6e-4 on
  stories260K), the bound the exactness tests use; fuse-attention on stories260K measures 0.0.
- lossy pipelines: ``apply(verify_inputs=...)`` keeps its SQNR floor (``DEFAULT_SQNR_FLOOR_DB``: the
  caller asked for a check); ``condfx optimize`` measures without a tolerance, because an untrained
  rewrite (interleave-heads, route-attention before training) is legitimately far from the
  original, and refuses only outputs that are not finite.
- ``condfx export``: ONNX Runtime against PyTorch on the same rewritten graph, which must agree
  whatever the passes: ``EXPORT_TOLERANCES`` (float32 1e-3 max abs over logits and caches, the
  bound the quantized-export tests use; stories260K measures 7.6e-6 with fuse-attention and 9.5e-6
  with KIVI 4-bit, so a lowering bug, a NaN or a swapped cache is far above it while larger models'
  longer float32 reductions keep a 100x margin).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from condfx.eval.perplexity import logits_of

# (atol, rtol) per dtype for exact rewrites; the one table the tests use too.
EXACT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
DEFAULT_SQNR_FLOOR_DB = 20.0
# ONNX Runtime vs PyTorch on one exported graph, max abs diff over logits and presents (see above).
EXPORT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.bfloat16: 2.5e-1,
    torch.float16: 5e-2,
}


class VerificationError(ValueError):
    """A verification check exceeded its tolerance or gave a non-finite figure (one sentence)."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_export_diffs(diffs: dict[str, float], dtype: torch.dtype = torch.float32,
                       where: str = "the export") -> None:
    """Refuses an export whose ONNX Runtime vs PyTorch differences are not finite or too large.

    Args:
        diffs: max |ORT - PyTorch| per check (``{"prefill": .., "decode": ..}``).
        dtype: the model's dtype, for ``EXPORT_TOLERANCES``.
        where: the bundle, as the message names it.

    Raises:
        VerificationError: one sentence with the worst figure and the tolerance.
    """
    tol = EXPORT_TOLERANCES.get(dtype, EXPORT_TOLERANCES[torch.float32])
    for name, diff in diffs.items():
        if not _finite(diff) or diff > tol:
            msg = (
                f"Verification of {where} failed: max |ONNX Runtime - PyTorch| on the {name} check is "
                f"{diff:.3g}, above the {str(dtype).removeprefix('torch.')} tolerance {tol:g}."
            )
            raise VerificationError(msg)


class VerifyMode(enum.Enum):
    EXACT = "exact"
    LOSSY = "lossy"


@dataclass(frozen=True)
class VerifyResult:
    """Metrics comparing two models' outputs, and whether they pass the mode's check."""

    ok: bool
    mode: str
    dtype: str
    max_abs_diff: float
    mean_abs_diff: float
    sqnr_db: float
    kl: float
    top1_agreement: float
    tolerance: float | None = None  # the max-abs-diff bound used in exact mode
    sqnr_floor_db: float | None = None  # the SQNR floor used in lossy mode
    metric_before: float | None = None
    metric_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite figures, such as an exact SQNR, become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def _bound(self) -> str:
        if self.tolerance is not None:
            return f"tol {self.tolerance:.1e}"
        if self.sqnr_floor_db is not None:
            return f"floor {self.sqnr_floor_db} dB"
        return "measured, no tolerance"

    def raise_if_failed(self, what: str) -> None:
        """Raises ``VerificationError`` (one sentence: the figure and the tolerance) unless ``ok``.

        Args:
            what: the rewrite checked, e.g. ``"the optimized model"``.
        """
        if self.ok:
            return
        if not _finite(self.max_abs_diff):
            msg = (f"Verification of {what} failed: max |logit diff| against the original is "
                   f"{self.max_abs_diff}, not a finite number.")
        elif self.tolerance is not None:
            msg = (f"Verification of {what} failed: max |logit diff| against the original is "
                   f"{self.max_abs_diff:.3g}, above the {self.dtype} tolerance {self.tolerance:.3g}.")
        else:
            msg = (f"Verification of {what} failed: SQNR against the original is {self.sqnr_db:.3g} dB, "
                   f"below the floor {self.sqnr_floor_db} dB.")
        raise VerificationError(msg)

    def summary(self) -> str:
        """One line: verdict and the main metrics."""
        bound = self._bound()
        return (
            f"{'ok' if self.ok else 'FAILED'} ({self.mode}, {self.dtype}): max|diff| {self.max_abs_diff:.3e} "
            f"({bound}), SQNR {self.sqnr_db:.1f} dB, KL {self.kl:.2e}, top-1 {self.top1_agreement:.1%}"
        )


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| in float64 over two tensors (or arrays), or two equally nested tuples/lists of them.

    The one max-difference function of the package. NaN is never hidden: a NaN in either input
    makes the result NaN (so ``max_abs_diff(...) <= tol`` fails), whatever the order of the parts;
    equal values, equal infinities included, differ by 0. Empty tensors differ by 0.

    Args:
        a, b: tensors, numpy arrays or numbers (shapes broadcast as in ``a - b``), or tuples/lists
            of such, nested alike.

    Returns:
        The largest absolute difference, 0.0 when there is nothing to compare, or NaN.

    Raises:
        ValueError: ``a`` and ``b`` are nested differently.
    """
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if not (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)):
            msg = f"max_abs_diff needs two alike nested sequences; got {type(a).__name__} and {type(b).__name__}."
            raise ValueError(msg)
        parts = [max_abs_diff(x, y) for x, y in zip(a, b, strict=True)]
        return math.nan if any(math.isnan(p) for p in parts) else max(parts, default=0.0)
    x = torch.as_tensor(a).detach().to("cpu", torch.float64)
    y = torch.as_tensor(b).detach().to("cpu", torch.float64)
    diff = torch.where(x == y, 0.0, (x - y).abs())  # inf - inf is NaN; equal infinities differ by 0
    return diff.max().item() if diff.numel() else 0.0  # max propagates NaN


def _run(model: nn.Module | Callable, inputs: Sequence[Any], dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None:
        inputs = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        return logits_of(model(*inputs))


def compare_outputs(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """The metrics of ``VerifyResult`` for two tensors of one shape (computed in float64)."""
    if ref.shape != out.shape:
        msg = f"verify(): output shapes differ: before {tuple(ref.shape)}, after {tuple(out.shape)}."
        raise ValueError(msg)
    a, b = ref.double(), out.double()
    diff = (a - b).abs()  # mean_abs_diff
    noise = (a - b).pow(2).sum().item()
    signal = a.pow(2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    kl = torch.sum(
        torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1)), dim=-1
    ).mean()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean()
    return {
        "max_abs_diff": max_abs_diff(a, b),
        "mean_abs_diff": diff.mean().item() if diff.numel() else 0.0,
        "sqnr_db": sqnr,
        "kl": max(kl.item(), 0.0),
        "top1_agreement": top1.item(),
    }


def verify(
    before: nn.Module | Callable,
    after: nn.Module | Callable,
    inputs: Sequence[Any] | torch.Tensor,
    *,
    mode: str | VerifyMode = "exact",
    dtype: torch.dtype | None = None,
    sqnr_floor_db: float | None = DEFAULT_SQNR_FLOOR_DB,
    metric: Callable[[nn.Module | Callable], float] | None = None,
) -> VerifyResult:
    """Runs ``before`` and ``after`` on ``inputs`` and compares their (first) outputs.

    Args:
        before: the reference model or callable.
        after: the rewritten model or callable.
        inputs: a tensor or a sequence of positional inputs.
        mode: "exact" (pass within the dtype tolerance) or "lossy" (pass above ``sqnr_floor_db``).
        dtype: cast floating inputs to this dtype first; the tolerance is looked up for the output dtype.
        sqnr_floor_db: the SQNR floor for lossy mode; None measures without a floor (the check then
            fails only on non-finite outputs).
        metric: optional callable scoring a model (e.g. perplexity on a text); reported for both.

    Returns:
        The VerifyResult.

    Raises:
        ValueError: unknown mode, or outputs of different shapes.
        TypeError: a model's output holds no tensor.
    """
    try:
        mode = VerifyMode(mode)
    except ValueError:
        msg = f"verify() mode must be one of {{exact, lossy}}; got {mode!r}."
        raise ValueError(msg) from None
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    ref, out = _run(before, inputs, dtype), _run(after, inputs, dtype)
    metrics = compare_outputs(ref, out)
    tol, floor = None, None
    if mode is VerifyMode.EXACT:
        atol, rtol = EXACT_TOLERANCES.get(ref.dtype, EXACT_TOLERANCES[torch.float32])
        tol = atol + rtol * (ref.double().abs().max().item() if ref.numel() else 0.0)
        ok = metrics["max_abs_diff"] <= tol
    elif sqnr_floor_db is None:
        ok = _finite(metrics["max_abs_diff"])
    else:
        floor = sqnr_floor_db
        ok = metrics["sqnr_db"] >= floor
    return VerifyResult(
        ok=ok,
        mode=mode.value,
        dtype=str(ref.dtype).removeprefix("torch."),
        tolerance=tol,
        sqnr_floor_db=floor,
        metric_before=metric(before) if metric else None,
        metric_after=metric(after) if metric else None,
        **metrics,
    )
