"""Rewrites of the torch Session's runner graph that cut per-op overhead, every value kept.

A SmolLM2 decode step runs ~1,900 graph nodes, most of them small ATen ops on one token. These
rewrites run on the runner's copy of the decode graph (``session.grow_in_place``), never on the
caller's graph (export and ONNX read that one), and each leaves the logits bit-identical:

Rewrites:
    w * (x * rsqrt(mean(x², -1, keepdim) + eps))          → torch.rms_norm(x, [d], w, eps)   (float32/64)
    x * c + cat(-x[..., h:], x[..., :h]) * s              → x * c + roll(x, h, -1) * cat(-s[..., :h], s[..., h:])
    two nodes with the same pure op and the same inputs   → one (the per-layer cos/sin unsqueezes)
    view / reshape to the shape a tensor already has      → the tensor
    aten.mul.Tensor(a, b) and the other ``_PYTHON`` ops   → torch.mul(a, b): the same kernel, called
                                                            through the lighter Python binding
    get_attr ``hf.model.layers.0.mlp.up_proj.weight``     → get_attr ``hf_model_layers_0_mlp_up_proj_weight``
                                                            (``flat_module``: one attribute lookup, not seven)

Requires: FakeTensor ``meta["val"]`` on the nodes (every condfx graph has it).
Does not handle: half-precision norms (``rms_norm`` upcasts where the spelled-out chain does not),
interleaved RoPE, norms with an offset weight (``1 + w``) or a bias.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

_PYTHON = {  # aten overload → the public function that dispatches to it with the same arguments
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.neg.default: torch.neg,
    aten.rsqrt.default: torch.rsqrt,
    aten.pow.Tensor_Scalar: torch.pow,
    aten.mean.dim: torch.mean,
    aten.cat.default: torch.cat,
    aten.cos.default: torch.cos,
    aten.sin.default: torch.sin,
    aten.silu.default: F.silu,
    aten.linear.default: F.linear,
    aten.embedding.default: torch.embedding,
    aten.view.default: torch.Tensor.view,
    aten.reshape.default: torch.reshape,
    aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.permute.default: torch.permute,
    aten.expand.default: torch.Tensor.expand,
}
# Pure ops two identical calls of which may share one result.
_SHAREABLE = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.transpose.int,
              aten.slice.Tensor, aten.expand.default, aten.mul.Tensor, aten.add.Tensor, aten.neg.default,
              aten.cos.default, aten.sin.default, aten.cat.default, aten.sym_size.int}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_NORM_DTYPES = (torch.float32, torch.float64)


def rotate_half_sin(sin: torch.Tensor, half: int) -> torch.Tensor:
    """``cat(-sin[..., :half], sin[..., half:])``: with it, ``rotate_half(x) * sin`` is
    ``roll(x, half, -1) * rotate_half_sin(sin)`` (the same products, one negation moved)."""
    return torch.cat([torch.neg(sin[..., :half]), sin[..., half:]], -1)


def _val(node: object):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is(node: object, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _other(node: fx.Node, one: object) -> object:
    """The operand of binary ``node`` that is not ``one`` (None when ``one`` is not an operand)."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _last_dim(node: fx.Node, dim: object) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and isinstance(dim, int) and dim % v.dim() == v.dim() - 1


def _plain_binary(node: object, target) -> bool:
    return _is(node, target) and len(node.args) == 2 and not node.kwargs


def _rms_norm_at(rsqrt: fx.Node):
    """(x, weight or None, eps, output node, chain) for the spelled-out float RMSNorm around ``rsqrt``."""
    add = rsqrt.args[0]
    if not _plain_binary(add, aten.add.Tensor) or not _only_user(add, rsqrt) or len(rsqrt.users) != 1:
        return None
    mean, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
    if not _is(mean, aten.mean.dim) or isinstance(eps, (fx.Node, bool)) or not isinstance(eps, (int, float)):
        return None
    if mean.kwargs or len(mean.args) != 3 or mean.args[2] is not True or not _only_user(mean, add):
        return None
    square = mean.args[0]
    if not (_is(square, aten.pow.Tensor_Scalar) and square.args[1] == 2 and _only_user(square, mean)):
        return None
    x, dims = square.args[0], mean.args[1]
    if not (isinstance(dims, (list, tuple)) and len(dims) == 1 and _last_dim(x, dims[0])):
        return None
    scaled = next(iter(rsqrt.users))
    if not _plain_binary(scaled, aten.mul.Tensor) or _other(scaled, rsqrt) is not x:
        return None
    xv = _val(x)
    vals = [_val(n) for n in (x, square, mean, add, rsqrt, scaled)]
    if not all(isinstance(v, torch.Tensor) and v.dtype == xv.dtype for v in vals) or xv.dtype not in _NORM_DTYPES:
        return None
    chain, out, weight = [square, mean, add, rsqrt, scaled], scaled, None
    user = next(iter(scaled.users)) if len(scaled.users) == 1 else None
    w = _other(user, scaled) if _plain_binary(user, aten.mul.Tensor) else None
    wv = _val(w)
    if isinstance(wv, torch.Tensor) and wv.dtype == xv.dtype and tuple(wv.shape) == (xv.shape[-1],):
        chain, out, weight = [*chain, user], user, w
    return x, weight, float(eps), out, chain


def _matches(graph: fx.Graph, target, match):
    """``match(node)`` for every node calling ``target`` where it is not None, over a snapshot of the
    nodes (the caller rewrites and erases between matches)."""
    for node in list(graph.nodes):
        if _is(node, target) and (found := match(node)) is not None:
            yield found


def _fuse_rms_norms(graph: fx.Graph) -> int:
    count = 0
    for x, weight, eps, out, chain in _matches(graph, aten.rsqrt.default, _rms_norm_at):
        with graph.inserting_before(out):
            fused = graph.call_function(torch.rms_norm, (x, [_val(x).shape[-1]], weight, eps))
        fused.meta.update(out.meta)
        out.replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        count += 1
    return count


def _half_slices(rot: fx.Node, x: fx.Node, users: fx.Node) -> int | None:
    """``half`` when ``rot`` is ``cat([neg(x[..., half:]), x[..., :half]], -1)`` used only by ``users``."""
    if not _is(rot, aten.cat.default) or rot.kwargs or len(rot.args) != 2 or not _only_user(rot, users):
        return None
    parts, dim = rot.args
    xv = _val(x)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and _last_dim(rot, dim)):
        return None
    neg, lo = parts
    hi = neg.args[0] if _is(neg, aten.neg.default) and _only_user(neg, rot) else None
    width = xv.shape[-1] if isinstance(xv, torch.Tensor) else None
    if not isinstance(width, int) or width % 2 or hi is None:
        return None
    half = width // 2
    for s, start, end in ((hi, half, None), (lo, 0, half)):
        ok = _is(s, aten.slice.Tensor) and s.args[0] is x and not s.kwargs and len(s.args) == 4
        ok = ok and _last_dim(x, s.args[1]) and s.args[2] == start and (s.args[3] >= width if end is None
                                                                         else s.args[3] == end)
        if not ok or len(s.users) != 1:
            return None
    return half


def _rope_at(add: fx.Node):
    """(mul of rot and sin, x, sin, half) for ``x * cos + cat(-x2, x1) * sin`` at ``add``."""
    if not _plain_binary(add, aten.add.Tensor):
        return None
    for straight, turned in (add.args, add.args[::-1]):
        if not (_plain_binary(straight, aten.mul.Tensor) and _plain_binary(turned, aten.mul.Tensor)):
            continue
        if not _only_user(turned, add):
            continue
        for rot, sin in (turned.args, turned.args[::-1]):
            for x in straight.args:
                half = _half_slices(rot, x, turned) if isinstance(x, fx.Node) else None
                sv = _val(sin)
                if half is not None and isinstance(sv, torch.Tensor) and sv.dim() and sv.shape[-1] == 2 * half:
                    return turned, rot, x, sin, half
    return None


def _fold_ropes(graph: fx.Graph) -> int:
    signed: dict[tuple[fx.Node, int], fx.Node] = {}
    count = 0
    for turned, rot, x, sin, half in _matches(graph, aten.add.Tensor, _rope_at):
        if (sin, half) not in signed:
            with graph.inserting_after(sin):
                signed[sin, half] = graph.call_function(rotate_half_sin, (sin, half))
            signed[sin, half].meta["val"] = _val(sin)
        with graph.inserting_before(turned):
            rolled = graph.call_function(torch.roll, (x, half, -1))
            product = graph.call_function(aten.mul.Tensor, (rolled, signed[sin, half]))
        rolled.meta["val"], product.meta["val"] = _val(x), _val(turned)
        turned.replace_all_uses_with(product)
        neg, lo = rot.args[0]
        for n in (turned, rot, neg, neg.args[0], lo):
            graph.erase_node(n)
        count += 1
    return count


def _key(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", value)  # 1 and 1.0 differ in type promotion
    return value


def _share_duplicates(graph: fx.Graph) -> int:
    seen: dict[object, fx.Node] = {}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SHAREABLE:
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            count += 1
        else:
            seen[key] = node
    return count


def _drop_same_shape_reshapes(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES:
            continue
        src, out = _val(node.args[0]), _val(node)
        if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
            continue
        if [str(s) for s in src.shape] == [str(s) for s in out.shape]:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            count += 1
    return count


def flat_module(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` (a copy of ``gm``'s, changed in place) whose attributes sit at
    the top level under flat names: the tensors and submodules are ``gm``'s own, not copies."""
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        obj = gm.get_submodule(node.target) if node.op == "call_module" else _attr(gm, node.target)
        name = node.target.replace(".", "_")
        while name in root and root[name] is not obj:
            name += "_"
        root[name], node.target = obj, name
    runner = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    runner.meta.update(gm.meta)
    return runner


def _attr(module: object, target: str) -> object:
    for atom in target.split("."):
        module = getattr(module, atom)
    return module


def slim_runner(graph: fx.Graph) -> Counter:
    """Applies every rewrite of this module to ``graph`` in place; returns how often each applied."""
    done = Counter()
    done["shared"] = _share_duplicates(graph)
    done["rms_norm"] = _fuse_rms_norms(graph)
    done["rope"] = _fold_ropes(graph)
    done["shared"] += _share_duplicates(graph)
    done["reshape"] = _drop_same_shape_reshapes(graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PYTHON:
            node.target = _PYTHON[node.target]
            done["python"] += 1
    graph.lint()
    return done
