"""L2A layers left by ``route-attention``: their nodes, parameters and recorded statistics.

``route-attention`` tags the nodes it inserts with ``node.meta["condfx_l2a"] = (prefix, role)``
and keeps the learned state in the submodule ``<prefix>.l2a`` (``prefix`` is the module owning the
attention's q projection, e.g. ``layers.0.attention``). Roles:
    "prob"   sigmoid(logit / temperature), (B, T): the soft routing probability (training loss)
    "route"  logit >= 0, (B, T) bool: the inference routing decision
    "routed" the ``condfx.routed_attention`` node (global branch core)
    "out"    stream + gate * global: the residual add ending the layer's global branch
The ``l2a`` submodule holds ``layer`` and ``window`` (int64 buffers), ``dense`` (bool buffer: run the global branch
for every query, set by the trainer on dense steps) and ``route_stats`` (float64 [routed, total]
query counts recorded by ``condfx.l2a.record_route_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

TAG = "condfx_l2a"
ROLES = ("prob", "route", "routed", "out")


@dataclass(frozen=True)
class RoutedLayer:
    """One L2A layer of a graph.

    Attributes:
        layer: the decoder layer index.
        prefix: dotted path of the module owning the attention (the ``l2a`` state is under it).
        state: the ``<prefix>.l2a`` module.
        nodes: role -> node (see the module docstring).
    """

    layer: int
    prefix: str
    state: nn.Module
    nodes: dict

    @property
    def routed_fraction(self) -> float | None:
        """Recorded fraction of queries routed to global attention, or None when none recorded."""
        routed, total = (float(x) for x in self.state.route_stats)
        return routed / total if total > 0 else None


def find_routed_layers(gm: fx.GraphModule) -> list[RoutedLayer]:
    """The L2A layers of ``gm`` in layer order (empty when ``route-attention`` never ran)."""
    found: dict[str, dict] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get(TAG)
        if tag is not None:
            found.setdefault(tag[0], {})[tag[1]] = node
    layers = []
    for prefix, nodes in found.items():
        state = gm.get_submodule(f"{prefix}.l2a")
        layers.append(RoutedLayer(int(state.layer), prefix, state, nodes))
    return sorted(layers, key=lambda r: r.layer)
