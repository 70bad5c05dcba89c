"""Skip saturated FFN blocks per token (FFN-SkipLLM): ``condfx.masked_ffn`` plus an in-graph policy.

Rewrites (FFN regions in graph order, n = their number; layers ``cold_start <= i < n - cold_end``):
    h_out = h_in + down(act(...x...))
        → execute_i = (countdown == 0) | (position < warmup)                      # (B, T) bool
          update_i, cos_i = condfx.masked_ffn(x, h_in, execute_i, weights..., kind, act, layout)
          h_out = h_in + update_i
          countdown = where(execute_i & ~warm & (cos_i >= threshold), span, max(countdown - 1, 0))
  emitted as one ``condfx.countdown_masked_ffn`` per layer (the three lines above in one op) for the
  blocks ``condfx.masked_ffn`` carries.
  The countdown (B, T) int64 starts at 0 and flows from layer to layer as tensor data; once an
  executed FFN's cos(h_in, h_out) reaches ``threshold`` the next ``span`` FFNs of that token are
  skipped. Cold layers keep their original FFN. Lossy (``exact = False``), except that a config
  under which no row ever skips reproduces the original outputs.

``policy=forecast`` (Informed Routing) rewrites each non-cold FFN instead to a learned router, the
  masked FFN and a low-rank forecast for routed-out rows (``skip_ffn_forecast.py``). The policies
  are strategy objects chosen through ``POLICIES`` (``skip_ffn_policy.FFNSkipPolicy``).

Positions: the policy reads the model's own position ``arange`` (the one feeding RoPE or the
  position embedding, found with ``add_kv_cache.find_position_aranges``), so when ``add-kv-cache``
  runs afterwards it offsets that arange by the cache length and warm-up counts absolute positions.
  In a graph already in decode form the offset arange (any start) that feeds the positions is used.

Prefill and decoding: the policy is applied to every token at position >= warmup, in prefill too.
  Each token's decision depends only on its own row (h_in, cos and the countdown are per row), so a
  full-sequence forward gives the same logits as token-by-token decoding; for teacher-forced
  "decode-mode" evaluation run the graph on the full sequence.

Cost: which FFNs run is decided at run time, so the report's FFN FLOPs/token estimate is the dense
  one (an upper bound); measure the skipped fraction with ``measure_skip_fraction``.

Forms: SwiGLU/GeGLU and GELU MLPs with plain weights run as ``condfx.masked_ffn``; every other FFN
  block (other activations, fused gate/up, post-norm or a scaled residual, MoE blocks with router,
  experts and shared expert, the MLP of a parallel attention + MLP block, blocks flattened to
  (B*T, d)) keeps its own nodes, moved between a gather of the executed rows and a scatter
  (``skip_ffn_branch.py``): its contribution to the residual stream is 0 on skipped rows.

Requires: the canonical IR and FFN regions (or MoE blocks) whose residual add was found; runs before
  or after ``fuse-attention`` and before ``add-kv-cache``.

Does not handle: FFNs without a residual add; blocks whose sizes are not products of the input's
  (B, T) or that read another (B, T) tensor (skipped with the reason); ``policy=forecast`` on the
  general form (its router and forecaster sit next to a ``condfx.masked_ffn``; skipped with a reason).
"""

from __future__ import annotations

from collections import Counter
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import fx

from condfx.passes._insert import erase_unused, remove_dead_calls
from condfx.passes.add_kv_cache import find_position_aranges, is_decode_form
from condfx.passes.base import GraphSnapshot, Pass, PassResult
from condfx.passes.graph_builder import GraphBuilder
from condfx.passes.report import estimate_cost
from condfx.passes.skip_ffn_branch import (
    branch_execute,
    bt_row,
    is_masked_branch,
    make_branch,
    probe_branch,
)
from condfx.passes.skip_ffn_config import SkipFFNConfig, SkipPolicy
from condfx.passes.skip_ffn_forecast import ForecastPolicy
from condfx.passes.skip_ffn_policy import (
    COUNTDOWN_FFN,
    MASKED_FFN,
    FFNSite,
    FFNSkipPolicy,
    execute_mask,
    is_countdown_ffn,
    is_masked_ffn,
)
from condfx.passes.skip_ffn_similarity import SimilarityPolicy
from condfx.patterns import _graph as g
from condfx.patterns import find_regions
from condfx.patterns.moe import MOE_FFN
from condfx.patterns.regions import FFNKind, FFNRegion, MoERegion, ResidualAdd

__all__ = ["COUNTDOWN_FFN", "MASKED_FFN", "POLICIES", "SkipFFN", "SkipFFNConfig", "SkipPolicy",
           "is_countdown_ffn", "is_masked_ffn", "measure_skip_fraction"]
aten = torch.ops.aten


POLICIES: MappingProxyType[SkipPolicy, FFNSkipPolicy] = MappingProxyType({
    SkipPolicy.SIMILARITY: SimilarityPolicy(),
    SkipPolicy.FORECAST: ForecastPolicy(),
})
"""The strategy of each ``SkipPolicy``: one line per policy."""


def _op_form(region: FFNRegion, residual: ResidualAdd) -> bool:
    """Whether ``condfx.masked_ffn`` carries ``region`` (else the general masked FFN does): plain
    weights, and nothing but casts, no-op dropout or a scale of 1 between its output and the add."""
    if region.post_norm is not None or region.residual_scale not in (None, 1.0) or region.kind is FFNKind.MLP:
        return False
    if g.skip_identity(residual.branch) is not region.out and region.residual_scale != 1.0:
        return False
    refs = [r for r in (region.up, region.gate, region.down) if r is not None]
    return (all(r.out_slice is None and r.weight is not None and r.weight.op == "get_attr" for r in refs)
            and all(r.bias is None or r.bias.op == "get_attr" for r in refs)
            and len({r.weight_layout for r in refs}) == 1)


def _moe_residual(moe: MoERegion, residuals: dict[fx.Node, ResidualAdd]) -> ResidualAdd | None:
    """The residual add of a MoE block (found by ``patterns/moe.py``, not always a ResidualAdd)."""
    add = moe.residual
    if add is None or moe.input_norm is None:
        return None
    if add in residuals:
        return residuals[add]
    stream = moe.input_norm.x_in
    first = g.skip_identity(add.args[0]) is stream or add.args[0] is stream
    return ResidualAdd(add, add.args[0] if first else add.args[1], add.args[1] if first else add.args[0])


def _site_form(gm: fx.GraphModule, region, residual: ResidualAdd | None, cfg: SkipFFNConfig):
    """(the general-form Branch or None for ``condfx.masked_ffn``, the skip reason or None)."""
    if residual is None:
        return None, "no residual add"
    if isinstance(region, FFNRegion) and _op_form(region, residual):
        return None, None
    if cfg.policy is SkipPolicy.FORECAST:
        return None, "policy=forecast runs on condfx.masked_ffn forms only (SwiGLU/GeGLU/GELU MLPs)"
    inputs = [region.x_in] if isinstance(region, FFNRegion) else [region.input_norm.out, region.x_in]
    reason = None
    for x in inputs:  # a MoE block: its norm's output, else the router's input (a cast of it)
        branch = make_branch(x, residual.branch, residual.stream, residual.node)
        reason = branch if isinstance(branch, str) else probe_branch(gm, branch, _ids(gm))
        if reason is None:
            return branch, None
    return None, reason


def _ids(gm: fx.GraphModule) -> fx.Node:
    """The model's first input: token ids (B, T), or embeddings (B, T, d) for a bare block."""
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def _position_node(gm: fx.GraphModule) -> fx.Node | None:
    """The model's token-position arange (offset by the cache length in decode form), or None."""
    ids = _ids(gm)
    if not is_decode_form(gm):
        found = find_position_aranges(gm, ids)
        return found[0] if found else None
    from condfx.passes.add_kv_cache import _reaches_position_use

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.arange.start and _reaches_position_use(node):
            return node
    return None


def _warm(b: GraphBuilder, row: fx.Node, x_in: fx.Node, pos: fx.Node | None, warmup: int) -> fx.Node | None:
    """(B, T) bool, True at positions < warmup, or None when ``warmup`` is 0."""
    if warmup == 0:
        return None
    if pos is None:
        t = b.call(aten.sym_size.int, row, 1)
        pos = b.call(aten.arange.default, t, device=x_in.meta["val"].device)
    warm = b.call(aten.lt.Scalar, pos, warmup)  # (T,)
    zeros_b = b.call(aten.zeros_like.default, row, dtype=torch.bool)
    return b.call(aten.bitwise_or.Tensor, zeros_b, warm)  # (B, T)


class SkipFFN(Pass):
    """``skip-ffn``: FFN regions outside the cold layers → ``condfx.masked_ffn`` with a skip policy."""

    name: ClassVar[str] = "skip-ffn"
    config_class: ClassVar[type] = SkipFFNConfig
    matches: ClassVar[str] = "FFN region"
    exact: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        cfg = self.config
        regions = find_regions(gm)
        ffn = regions.ffn
        blocks = _blocks(regions)
        existing = [n for n in gm.graph.nodes if is_masked_ffn(n) or is_countdown_ffn(n) or is_masked_branch(n)]
        skipped = [("already rewritten", f"node {n.name}") for n in existing]
        n = len(blocks) + len(existing)
        if blocks and not existing and cfg.cold_start + cfg.cold_end >= n:
            msg = (
                f"skip-ffn cold_start={cfg.cold_start} + cold_end={cfg.cold_end} leave none of the "
                f"{n} FFN layers to skip; they must add up to less than {n}."
            )
            raise ValueError(msg)
        residuals = {r.node: r for r in regions.residuals}
        todo = []
        for i, (region, residual) in enumerate(_with_residuals(blocks, residuals) if not existing else []):
            if i < cfg.cold_start or i >= n - cfg.cold_end:
                skipped.append(("cold region", f"layer {region.layer}"))
                continue
            branch, reason = _site_form(gm, region, residual, cfg)
            if reason:
                skipped.append((reason, f"layer {region.layer}"))
            else:
                todo.append((region, residual, branch))
        if todo:
            self._rewrite(gm, todo)
            gm.meta["condfx_ffn_layers"] = (n, len(todo))  # (all FFN layers, masked ones): runtime counting
        report = snapshot.report(
            gm, self.name, matched=n, rewritten=len(todo), skipped=tuple(skipped),
            near_misses=tuple(str(f) for f in regions.failures if f.kind in ("", "ffn", "moe")
                              and f.reason != MOE_FFN),
            cost_before=estimate_cost(regions.attention, ffn),
            cost_after=estimate_cost(regions.attention, ffn),  # decided at run time: see docstring
        )
        return PassResult(gm, bool(todo), report)

    def _rewrite(self, gm: fx.GraphModule, todo: list) -> None:
        """Builds the shared warm-up mask, then lets the configured policy rewrite each FFN."""
        cfg, policy = self.config, POLICIES[self.config.policy]
        context = policy.prepare(gm, cfg)
        pos = _position_node(gm) if cfg.warmup else None
        region, first = todo[0][:2]
        x_in = region.x_in if isinstance(region, FFNRegion) else first.stream  # (B, T, d)
        b = GraphBuilder(gm, first.node)
        row = bt_row(b, x_in if x_in.meta["val"].dim() == 3 else _ids(gm))  # (B, T)
        carry = policy.start(b, row, cfg)
        warm = _warm(b, row, x_in, pos, cfg.warmup)
        sites = [FFNSite(r, res, i, warm, branch) for i, (r, res, branch) in enumerate(todo)]
        for site in sites:
            carry = policy.rewrite(GraphBuilder(gm, site.residual.node), site, cfg, carry)
        policy.finish(gm, cfg, sites, context)
        erase_unused(gm.graph, [n for s in sites if s.branch is not None for n in s.branch.nodes])
        remove_dead_calls(gm.graph)
        gm.graph.lint()
        gm.recompile()


def _blocks(regions) -> list:
    """The dense FFN regions and the MoE blocks, in graph order of their outputs."""
    order = {node: i for i, node in enumerate(regions.ffn[0].out.graph.nodes)} if regions.ffn else None
    moe = list(getattr(regions, "moe", []))
    if order is None and moe:
        order = {node: i for i, node in enumerate(moe[0].out.graph.nodes)}
    return sorted([*regions.ffn, *moe], key=lambda r: order[r.out])


def _with_residuals(blocks: list, residuals: dict[fx.Node, ResidualAdd]):
    """(region, its ResidualAdd or None) for each block."""
    for region in blocks:
        if isinstance(region, MoERegion):
            yield region, _moe_residual(region, residuals)
        else:
            yield region, residuals.get(region.residual) if region.residual is not None else None


def measure_skip_fraction(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict:
    """Runs ``gm`` on ``inputs`` and counts the rows each ``condfx.masked_ffn`` node skipped.

    Args:
        gm: a module rewritten by ``skip-ffn``.
        *inputs: its inputs (e.g. input_ids (B, T)).

    Returns:
        {"per_node": {node name: skipped fraction}, "skipped_rows", "rows" (over masked FFNs),
        "fraction" (skipped / rows of the masked FFNs), "ffn_layers" (all FFN layers, cold ones
        included), "fraction_of_all_ffn" (skipped rows / (rows per layer x all FFN layers))}.
    """
    counts: Counter = Counter()
    totals: Counter = Counter()

    class _Counting(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if is_masked_ffn(node) or is_countdown_ffn(node) or is_masked_branch(node):
                execute = self.env[branch_execute(node)] if is_masked_branch(node) else execute_mask(node, self.env, out)
                counts[node.name] += int((~execute).sum())
                totals[node.name] += execute.numel()
            return out

    with torch.no_grad():
        _Counting(gm).run(*inputs)
    rows, skipped = sum(totals.values()), sum(counts.values())
    recorded = gm.meta.get("condfx_ffn_layers")  # (all FFN layers, masked ones), as the pass saw them
    # re-finding regions would also count the routers' and forecasters' small MLPs as FFN layers
    layers = recorded[0] if recorded else len(_blocks(find_regions(gm))) + len(totals)
    per_layer_rows = rows / len(totals) if totals else 0
    return {
        "per_node": {k: counts[k] / totals[k] for k in totals},
        "skipped_rows": skipped,
        "rows": rows,
        "fraction": skipped / rows if rows else 0.0,
        "ffn_layers": layers,
        "fraction_of_all_ffn": skipped / (per_layer_rows * layers) if layers and rows else 0.0,
    }
