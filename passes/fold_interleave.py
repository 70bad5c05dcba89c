"""Fold IHA's Q/K/V head mixing into the projection weights: one wider GEMM, no mixing einsum.

Rewrites (for each of q, k, v of every ``condfx.interleaved_attention`` node):
    flatten(einsum("bmtd,mhp->bhtpd", transpose(view(linear(x, W, b), (B, T, n, D)), 1, 2), alpha), 2, 3)
      → flatten(permute(unflatten(linear(x, W~, b~), -1, (n, P, D)), (0, 2, 1, 3, 4)), 2, 3)
    W~[h, p] = sum_m alpha[m, h, p] W[m]   (W viewed as (n, D, d)), b~ likewise: W~ is (n*P*D, d).
  Exact up to float rounding (the mix is linear and sits right after the projection): logits agree
  within 1e-5 in float32. The alphas and the now unused projection weights are removed from the
  module; the folded weights are registered as ``<module>.iha_fold_{q,k,v}_weight`` / ``_bias``.

Requires: ``interleave-heads`` ran (else the pass fails: there is nothing to fold). Runs before
  ``add-kv-cache``.

Does not handle: a mix whose input is not a plain projection (QK-norm between projection and mix, as
  in Qwen3; a fused qkv projection is handled through its output slice), skipped with a reason.
  The collapse and the output projection are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from condfx.passes._insert import register_tensor
from condfx.passes.base import GraphSnapshot, Pass, PassError, PassResult
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.interleave_heads import is_interleaved_attention
from condfx.patterns import _graph as g

aten = torch.ops.aten
NOT_MIX = "input is not a mixing einsum (already folded)"
NOT_PROJECTION = "mixing input is not a plain projection"


@dataclass(frozen=True)
class FoldInterleaveConfig:
    """Options of ``fold-interleave`` (none: every interleaved attention node is folded)."""


@dataclass(frozen=True)
class _Mix:
    flat: fx.Node  # the flatten node the attention reads
    alpha: fx.Node  # get_attr (n, n, P)
    proj: object  # LinearRef of the projection
    heads: int


def _projection_behind(x: fx.Node):
    """The LinearRef whose (B, T, n*D) output is viewed to (B, T, n, D) and transposed to ``x``."""
    x = g.skip_identity(x)
    if g.is_op(x, aten.transpose) and {a % 4 for a in x.args[1:3]} == {1, 2}:
        x = g.skip_identity(x.args[0])
    elif g.is_op(x, aten.permute) and [a % 4 for a in x.args[1]] == [0, 2, 1, 3]:
        x = g.skip_identity(x.args[0])
    else:
        return None
    if not g.is_op(x, aten.view, aten.reshape, aten._unsafe_view) or g.ndim(x) != 4:
        return None
    return g.trace_linear(x.args[0])


def match_mix(flat: fx.Node) -> _Mix | str:
    """The mix feeding one attention input, or a skip reason."""
    if not g.is_op(flat, aten.flatten) or not g.is_op(flat.args[0], aten.einsum):
        return NOT_MIX
    x, alpha = flat.args[0].args[1]
    if alpha.op != "get_attr":
        return NOT_MIX
    ref = _projection_behind(x)
    if ref is None or ref.weight.op != "get_attr" or (ref.bias is not None and ref.bias.op != "get_attr"):
        return NOT_PROJECTION
    return _Mix(flat, alpha, ref, int(alpha.meta["val"].shape[0]))


def _weights(gm, mix: _Mix) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in), b) of the projection, restricted to its output slice."""
    ref = mix.proj
    w = g.get_attr_value(gm, ref.weight).detach()
    w = w if ref.weight_layout == "out_in" else w.t()
    b = g.get_attr_value(gm, ref.bias).detach() if ref.bias is not None else None
    if ref.out_slice is not None:
        lo, hi = ref.out_slice
        w, b = w[lo:hi], (b[lo:hi] if b is not None else None)
    return w, b


def fold_replacement(gm: fx.GraphModule, mix: _Mix, role: str) -> None:
    """Inserts the folded projection and reroutes the attention input to it."""
    alpha = g.get_attr_value(gm, mix.alpha).detach()  # (n, n, P)
    n, p = mix.heads, alpha.shape[2]
    w, b = _weights(gm, mix)
    d = w.shape[0] // n
    # float64 products, so the folded weights carry one rounding, not two
    a64 = alpha.double()
    w_f = torch.einsum("mhp,mdi->hpdi", a64, w.double().reshape(n, d, -1)).reshape(n * p * d, -1)
    w_f = w_f.to(w.dtype)
    path = mix.alpha.target.rpartition(".")[0]
    names = [register_tensor(gm, path, f"iha_fold_{role}_weight", w_f, False)]
    if b is not None:
        b_f = torch.einsum("mhp,md->hpd", a64, b.double().reshape(n, d)).reshape(-1).to(b.dtype)
        names.append(register_tensor(gm, path, f"iha_fold_{role}_bias", b_f, False))
    flat = mix.flat
    b = GraphBuilder(gm, flat)
    attrs = [b.get_attr(name) for name in names]
    y = b.call(aten.linear.default, mix.proj.x_in, *attrs)  # (B, T, n*P*D)
    y = b.call(aten.unflatten.int, y, -1, [n, p, d])  # (B, T, n, P, D)
    y = b.call(aten.permute.default, y, [0, 2, 1, 3, 4])  # (B, n, T, P, D)
    y = b.call(aten.flatten.using_ints, y, 2, 3)  # (B, n, T*P, D)
    flat.replace_all_uses_with(y)


def _drop_unused_attrs(gm: fx.GraphModule, before: set[str]) -> None:
    """Deletes parameters that get_attr nodes read before the pass and no longer read."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in sorted(before - used):
        holder_path, _, attr = name.rpartition(".")
        holder = gm.get_submodule(holder_path) if holder_path else gm
        if isinstance(getattr(holder, attr, None), nn.Parameter):
            delattr(holder, attr)


class FoldInterleave(Pass):
    """``fold-interleave``: IHA mixing einsums → folded projection weights."""

    name: ClassVar[str] = "fold-interleave"
    config_class: ClassVar[type] = FoldInterleaveConfig
    matches: ClassVar[str] = "condfx.interleaved_attention node"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        nodes = [n for n in gm.graph.nodes if is_interleaved_attention(n)]
        if not nodes:
            reason = "fold-interleave found no condfx.interleaved_attention node to fold: run interleave-heads first"
            raise PassError(self.name, reason)
        attrs_before = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        skipped, folded = [], 0
        for i, node in enumerate(nodes):
            found = {role: match_mix(x) for role, x in zip("qkv", node.args[:3], strict=True)}
            bad = next((f for f in found.values() if isinstance(f, str)), None)
            if bad is not None:
                skipped.append((bad, f"interleaved attention {i} ({node.name})"))
                continue
            for role, mix in found.items():
                fold_replacement(gm, mix, role)
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code(
                is_impure_node=lambda n: n.op not in ("call_function", "get_attr") or n.is_impure()
            )
            _drop_unused_attrs(gm, attrs_before)
            gm.graph.lint()
            gm.recompile()
        report = snapshot.report(
            gm, self.name, matched=len(nodes), rewritten=folded, skipped=tuple(skipped)
        )
        return PassResult(gm, folded > 0, report)
