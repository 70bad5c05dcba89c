"""The backward of an opaque op by recomputation: differentiate its eager form on the saved inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def grads_by_recompute(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                       grad: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients of ``fn(*inputs)`` (a differentiable eager form of the op) with respect to each
    of ``inputs``, given the output's gradient ``grad``. A None input gets None; an input the output
    does not depend on, or every input when the output depends on none (e.g. no routed row), gets
    zeros."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        wrt = [t for t in leaves if t is not None]
        out = fn(*leaves)
        found = torch.autograd.grad(out, wrt, grad, allow_unused=True) if out.requires_grad else [None] * len(wrt)
    found = iter(found)
    grads = []
    for t in leaves:
        g = None if t is None else next(found)
        grads.append(None if t is None else torch.zeros_like(t) if g is None else g)
    return grads
