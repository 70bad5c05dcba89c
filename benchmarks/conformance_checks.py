"""The checks of one conformance row: capture, regions, fuse-attention, the lossy passes, Session, ONNX.

Every cell is a string: ``"ok ..."`` (green), ``"n/a: reason"`` (the check does not apply to this
form; counts as green, see ``NOT_APPLICABLE``), ``""`` (not run) or the one-sentence reason it failed.
A row is all-green when every cell that ran is green (``Row.green``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

import condfx
from benchmarks.conformance_build import N_LAYERS, first_sentence
from condfx.models_zoo.hf import CausalLMLogits
from condfx.patterns import find_regions
from condfx.patterns._graph import layer_from_path, module_path, static_int

EXACT_TOL = 1e-5  # fuse-attention: max |logit diff| against the captured model, float32
ONNX_TOL = 1e-4  # ONNX Runtime against the torch decode graph (prefill and a decode step)
NEW_TOKENS = 8  # greedy tokens compared between the Session and HF generate
PROMPT = (1, 17, 42, 99, 5, 63)
PASS_SPECS = MappingProxyType({
    "route-attention": "route-attention",
    "kivi": "quantize-kv{method=kivi,group=16}",  # group 16: the small heads are 16 wide (MQA: 16 in all)
    "xquant": "quantize-kv{method=xquant,group=16}",
    "skip-ffn": "skip-ffn{cold_start=0,cold_end=0}",
})
# Skip reasons that mean "the technique is not defined for this form" (not "not yet"): a layer a
# pass skips with one of these counts as green. Everything else a pass skips is a gap.
NOT_APPLICABLE = MappingProxyType({
    "route-attention": ("non-causal attention",),
    "kivi": (),
    "xquant": ("multi-head latent attention",),  # MLA caches its own latent already
    "skip-ffn": (),
})
COLUMNS = ("capture", "attention", "ffn", "fuse_attention", *PASS_SPECS, "session", "onnx")


@dataclass
class Row:
    """One (model type, attention implementation) of the table; cells as in the module docstring."""

    model_type: str
    attn: str
    build: str = "ok"
    excluded: str = ""  # an Exclusion value when the class is left out
    capture: str = ""
    attention: str = ""
    ffn: str = ""
    fuse_attention: str = ""
    passes: dict[str, str] = field(default_factory=dict)
    session: str = ""
    onnx: str = ""
    seconds: float = 0.0

    def cells(self) -> dict[str, str]:
        """Every check's cell by column name (``COLUMNS``), ``""`` for checks not run."""
        fixed = {c: getattr(self, c) for c in ("capture", "attention", "ffn", "fuse_attention", "session", "onnx")}
        return {c: fixed.get(c, self.passes.get(c, "")) for c in COLUMNS}

    def green(self) -> bool:
        """Built, every cell that ran is ``ok`` or ``n/a``, and attention or FFN was found somewhere
        (a model whose every layer is ``n/a``, such as Mamba, measured nothing and is not green)."""
        ran = [c for c in self.cells().values() if c]
        measured = not self.attention or not (self.attention.startswith("n/a") and self.ffn.startswith("n/a"))
        return self.build == "ok" and bool(ran) and all(is_green(c) for c in ran) and measured


def is_green(cell: str) -> bool:
    """Whether a cell counts as passing (``ok ...`` or ``n/a: ...``)."""
    return cell.startswith(("ok", "n/a"))


@dataclass(frozen=True)
class Layers:
    """Which of the ``N_LAYERS`` layers hold softmax attention and an FFN, and what the others are.

    ``other`` maps each layer without one of them to its kind ("linear_attention", "conv", ...); the
    cells count only the layers that have the part and mark the rest ``n/a`` with that kind.
    """

    attention: tuple[int, ...] = tuple(range(N_LAYERS))
    ffn: tuple[int, ...] = tuple(range(N_LAYERS))
    kinds: tuple[str, ...] = ()

    def note(self, part: str) -> str:
        """``"; n/a: layer 0 is a conv layer, not attention"`` for the layers without ``part``."""
        have = self.attention if part == "attention" else self.ffn
        missing = [i for i in range(N_LAYERS) if i not in have]
        if not missing:
            return ""
        what = ", ".join(f"layer {i} is a {self.kind(i)} layer" for i in missing)
        return f"; n/a: {what}, not {part}"

    def kind(self, i: int) -> str:
        return self.kinds[i] if i < len(self.kinds) else "non-attention"


# Config fields that name each layer's kind, and the kinds that are softmax attention.
_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")
_FFN_MODULES = ("mlp", "ffn", "feed_forward", "moe", "expert", "block_sparse_moe")


def _is_attention_kind(kind: str) -> bool:
    kind = kind.lower()
    return ("attention" in kind and not kind.startswith("linear")) or kind in ("hybrid", "hybrid_sliding")


def _layer_kinds(model: CausalLMLogits) -> tuple[str, ...]:
    config = model.hf.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _KIND_FIELDS:
        kinds = getattr(text, key, None)
        if isinstance(kinds, (list, tuple)) and len(kinds) >= N_LAYERS and all(isinstance(k, str) for k in kinds):
            return tuple(kinds[:N_LAYERS])
    return ()


def _layer_of(node) -> int | None:
    return layer_from_path(module_path(node)) if node is not None else None


def _ffn_layers(model: CausalLMLogits) -> set[int]:
    """Layers with an FFN-like submodule (mlp, feed_forward, moe, experts, ...) in the HF model."""
    found = set()
    for name, _ in model.hf.named_modules():
        layer = layer_from_path(name)
        tail = name.rsplit(".", 1)[-1].lower()
        if layer is not None and any(m in tail for m in _FFN_MODULES):
            found.add(layer)
    return found


def layers_of(model: CausalLMLogits, gm, regions) -> Layers:
    """The attention and FFN layers of the captured ``gm``.

    A layer is an attention layer when the graph has an attention core there (a region, a rejected
    attention candidate or an SDPA call) or the config calls it attention; only a layer with neither
    (Mamba, linear attention, conv, recurrent) is left out, named by the config's kind. A layer is an
    FFN layer when it has an FFN region, a rejected FFN candidate or an FFN-like submodule.
    """
    kinds = _layer_kinds(model)
    attn = {r.layer for r in regions.attention}
    attn |= {_layer_of(f.node) for f in regions.failures if f.kind in ("attention", "block")}
    attn |= {_layer_of(n) for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)}
    attn |= {i for i, k in enumerate(kinds) if _is_attention_kind(k)}
    if not kinds and attn - {None} == set():  # no kinds, no cores: keep every layer (the cell says why)
        attn = set(range(N_LAYERS))
    ffn = {r.layer for r in regions.ffn} | {m.layer for m in getattr(regions, "moe", [])}
    near = {_layer_of(f.node) for f in regions.failures if f.kind in ("ffn", "moe")}
    ffn |= {i for i in near if i is None or i >= len(kinds) or _is_attention_kind(kinds[i])}  # not a mixer's gate
    ffn |= _ffn_layers(model)
    if not ffn - {None} and not (kinds and not attn - {None}):  # an SSM's layers are mixers only
        ffn = set(range(N_LAYERS))
    pick = lambda found: tuple(i for i in range(N_LAYERS) if i in found)  # noqa: E731
    return Layers(pick(attn), pick(ffn), kinds)


def _per_layer(found: int, expected: int = N_LAYERS, note: str = "") -> str:
    if expected == 0:
        return f"n/a{note[len('; n/a'):]}"
    return f"ok {found}/{expected}{note}" if found == expected else f"{found}/{expected}"


def _with_reasons(cell: str, failures, kind: tuple[str, ...]) -> str:
    if is_green(cell):
        return cell
    reasons = sorted({f.reason for f in failures if f.kind in kind})
    return f"{cell}: {'; '.join(reasons) or 'no candidate'}"


def pass_cell(gm, name: str, layers: Layers = Layers()) -> str:
    """``ok N/N``, ``n/a: ...`` when every layer not rewritten has a not-applicable reason, or why.

    N counts the layers the pass is for (attention layers; FFN layers for skip-ffn), see ``Layers``.
    """
    part = "ffn" if name == "skip-ffn" else "attention"
    n, note = len(layers.ffn if part == "ffn" else layers.attention), layers.note(part)
    if n == 0:
        return _per_layer(0, 0, note)
    try:
        result = condfx.apply(gm, PASS_SPECS[name], allow_partial=True)  # the cell lists the skips
    except Exception as err:  # noqa: BLE001  (a table cell, whatever failed)
        return first_sentence(err)
    report = result.reports[0]
    if report.rewritten == n:
        return f"ok {report.rewritten}/{n}{note}"
    counts = report.skip_counts()
    reasons = "; ".join(sorted(counts)) or "no reason"
    legit = NOT_APPLICABLE[name]
    skipped = sum(counts.values())
    if report.rewritten + skipped == n and all(r.startswith(legit) for r in counts) and legit:
        return f"n/a: {report.rewritten}/{n}, {reasons}"
    return f"{report.rewritten}/{n}: {reasons}"


def hf_greedy(model: CausalLMLogits, prompt: tuple[int, ...], n: int) -> tuple[list[int], str]:
    """The HF model's own ``generate`` greedy continuation (no EOS stop), and how it was made."""
    import copy

    hf = model.hf
    ids = torch.tensor([prompt])
    try:
        config = copy.deepcopy(hf.generation_config)
        config.update(do_sample=False, max_new_tokens=n, min_new_tokens=None, eos_token_id=None,
                      num_beams=1, repetition_penalty=None, pad_token_id=0)
        with torch.no_grad():
            out = hf.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids))
        return out[0, len(prompt):].tolist(), "generate"
    except Exception:  # noqa: BLE001  (fall back to HF's forward without a cache)
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        return ids[0, len(prompt):].tolist(), "forward loop (generate failed)"


def session_cell(decode_gm, model: CausalLMLogits) -> str:
    """Greedy decode through the torch Session equal to HF ``generate`` greedy (``NEW_TOKENS``)."""
    from condfx.runtime.generate import generate
    from condfx.runtime.session import Session

    try:
        session = Session.from_graph(decode_gm, max_seq_len=model.info.max_seq_len)
        got = generate(session, [list(PROMPT)], max_new_tokens=NEW_TOKENS)[0]
    except Exception as err:  # noqa: BLE001
        return f"Session: {first_sentence(err)}"
    want, how = hf_greedy(model, PROMPT, NEW_TOKENS)
    if got == want:
        return f"ok {NEW_TOKENS}/{NEW_TOKENS}" + ("" if how == "generate" else f" vs {how}")
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"greedy token {first} is {got[first]}, HF {how} gives {want[first]}"


def onnx_cell(decode_gm) -> str:
    """The decode graph exported to ONNX, ONNX Runtime within ``ONNX_TOL`` of it."""
    from condfx.export_bundle import export_decode_graph

    try:
        with tempfile.TemporaryDirectory() as out:
            bundle = export_decode_graph(decode_gm, out, passes="fuse-attention")
    except Exception as err:  # noqa: BLE001
        return f"export: {first_sentence(err)}"
    diff = bundle.max_abs_diff
    return f"ok {diff:.1e}" if diff <= ONNX_TOL else f"ONNX Runtime differs by {diff:.1e}"


def _fuse(model: CausalLMLogits, gm, row: Row, layers: Layers = Layers()):
    """Fills ``row.fuse_attention``; returns the fused graph (None when fusing failed)."""
    if not layers.attention:  # nothing to fuse: the graph as captured decodes
        row.fuse_attention = _per_layer(0, 0, layers.note("attention"))
        return gm
    try:
        fused = condfx.apply(gm, "fuse-attention").graph_module
        other = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (model(other) - fused(other)).abs().max().item()
        row.fuse_attention = f"ok {diff:.1e}" if diff <= EXACT_TOL else f"max diff {diff:.1e}"
        return fused
    except Exception as err:  # noqa: BLE001
        row.fuse_attention = _static_length(gm) or first_sentence(err)
        return None


def _static_length(gm) -> str:
    """The reason when the captured graph only runs at its example length (the model's code fixed it)."""
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    shape = getattr(ids.meta.get("val"), "shape", ()) if ids is not None else ()
    length = static_int(shape[1]) if len(shape) >= 2 else None
    if length is not None:
        return f"the captured graph runs at sequence length {length} only (the model's code fixed it)"
    return ""


def _decode(model: CausalLMLogits, fused, row: Row, onnx: bool) -> None:
    """Fills ``row.session`` (and ``row.onnx``) from the fused graph's decode form."""
    decode, reason = None, "fuse-attention failed"
    if fused is not None:
        try:
            decode = condfx.apply(fused, "add-kv-cache").graph_module
        except Exception as err:  # noqa: BLE001
            reason = f"add-kv-cache: {first_sentence(err)}"
    if decode is None:
        row.session, row.onnx = reason, (reason if onnx else "")
        return
    row.session = session_cell(decode, model)
    row.onnx = onnx_cell(decode) if onnx else ""


def measure(model: CausalLMLogits, row: Row, passes: bool = True, decode: bool = False,
            onnx: bool = False) -> Row:
    """Fills ``row`` from ``model``: capture, regions, fuse-attention, the passes, Session, ONNX."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        gm = condfx.capture(model, (ids,))
    except Exception as err:  # noqa: BLE001
        row.capture = first_sentence(err)
        return row
    row.capture = "ok"
    regions = find_regions(gm)
    layers = layers_of(model, gm, regions)
    found = _per_layer(len(regions.attention), len(layers.attention), layers.note("attention"))
    row.attention = _with_reasons(found, regions.failures, ("attention", "block"))
    moe = getattr(regions, "moe", [])  # MoE blocks are FFN regions of their own
    found = _per_layer(len(regions.ffn) + len(moe), len(layers.ffn), layers.note("ffn"))
    row.ffn = _with_reasons(found, regions.failures, ("ffn", "moe"))
    row.ffn += f" ({len(moe)} MoE)" if moe else ""
    fused = _fuse(model, gm, row, layers)
    if passes:
        row.passes = {name: pass_cell(gm, name, layers) for name in PASS_SPECS}
    if decode or onnx:
        _decode(model, fused, row, onnx)
    return row
