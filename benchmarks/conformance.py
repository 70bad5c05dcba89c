"""Conformance table: every decoder-only class of the installed transformers, built small, through condfx.

For every model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` whose config builds with small sizes
(2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128, random weights), in SDPA and eager where the class
offers them, this reports: capture ok, attention and FFN regions found (of 2 layers), fuse-attention
exactness (max logit difference, float32) and, for route-attention, quantize-kv{method=kivi},
quantize-kv{method=xquant} and skip-ffn, "ok N/M" or the reason the pass gave. Encoder-decoders,
encoder-only models and classes that fail to build are listed with the reason.

    python benchmarks/conformance.py [--only llama,gemma3] [--attn sdpa,eager] [--json]

It is not a test; ``tests/patterns/test_conformance.py`` runs a handful of rows in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from types import MappingProxyType

import torch

import condfx
from condfx.models_zoo.hf import CausalLMLogits
from condfx.patterns import find_regions

N_LAYERS = 2
EXACT_TOL = 1e-5
# Small sizes under every spelling transformers configs use; unknown keys are harmless attributes.
SMALL = MappingProxyType(dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
    n_embd=64, n_layer=N_LAYERS, n_head=4, n_positions=128, n_inner=128, ffn_dim=128, d_model=64,
    num_layers=N_LAYERS, num_heads=4, num_kv_heads=2, kv_channels=16, ffn_hidden_size=128,
    moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=64,
))
PASS_SPECS = MappingProxyType({
    "route-attention": "route-attention",
    "kivi": "quantize-kv{method=kivi}",
    "xquant": "quantize-kv{method=xquant}",
    "skip-ffn": "skip-ffn{cold_start=0,cold_end=0}",
})


@dataclass
class Row:
    """One (model type, attention implementation) of the table; cells are "ok ..." or a reason."""

    model_type: str
    attn: str
    build: str = "ok"
    capture: str = ""
    attention: str = ""
    ffn: str = ""
    fuse_attention: str = ""
    passes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def green(self) -> bool:
        """Whether every cell that ran is green."""
        cells = [self.build, self.capture, self.attention, self.ffn, self.fuse_attention, *self.passes.values()]
        return all(c.startswith("ok") for c in cells)


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^pass '[^']*' failed \(passes run before it: [^)]*\): ", "", text)
    return text[:160]


def small_config(model_type: str, attn: str):
    """The small config of ``model_type`` with ``attn`` implementation (raises when it cannot build)."""
    from transformers import AutoConfig

    sizes = dict(SMALL)
    for _ in range(8):  # drop the keys a config refuses (read-only properties such as Falcon's head_dim)
        try:
            config = AutoConfig.for_model(model_type, **sizes)
            break
        except AttributeError as err:
            refused = re.search(r"property '(\w+)'|set (\w+) with", str(err))
            if refused is None or (refused.group(1) or refused.group(2)) not in sizes:
                raise
            sizes.pop(refused.group(1) or refused.group(2))
    else:
        config = AutoConfig.for_model(model_type, **sizes)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in sizes.items():
        if hasattr(text, key) and key not in ("pad_token_id", "bos_token_id", "eos_token_id"):
            with contextlib.suppress(Exception):
                setattr(text, key, value)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:N_LAYERS]
    config._attn_implementation = attn
    return config


def build_small(model_type: str, attn: str, seed: int = 0) -> CausalLMLogits:
    """A seeded, float32, eval-mode small model of ``model_type`` wrapped to return logits."""
    from transformers import AutoModelForCausalLM

    from condfx.models_zoo.hf import decoder_refusal

    config = small_config(model_type, attn)
    refusal = decoder_refusal(config)
    if refusal is not None:
        msg = f"not a decoder-only causal LM: {refusal}"
        raise ValueError(msg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return CausalLMLogits(hf.float().eval(), model_type)


def _per_layer(found: int) -> str:
    return f"ok {found}/{N_LAYERS}" if found == N_LAYERS else f"{found}/{N_LAYERS}"


def _with_reasons(cell: str, failures, kind: str) -> str:
    if cell.startswith("ok"):
        return cell
    reasons = sorted({f.reason for f in failures if f.kind in kind})
    return f"{cell}: {'; '.join(reasons) or 'no candidate'}"


def _pass_cell(gm, spec: str) -> str:
    try:
        result = condfx.apply(gm, spec)
    except Exception as err:  # noqa: BLE001  (a table cell, whatever failed)
        return _first_sentence(err)
    report = result.reports[0]
    if report.rewritten == N_LAYERS:
        return f"ok {report.rewritten}/{N_LAYERS}"
    reasons = "; ".join(sorted(report.skip_counts()))
    return f"{report.rewritten}/{N_LAYERS}: {reasons or 'no reason'}"


def measure(model: CausalLMLogits, row: Row, passes: bool = True) -> Row:
    """Fills ``row`` from ``model``: capture, regions, fuse-attention exactness, the other passes."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        gm = condfx.capture(model, (ids,))
    except Exception as err:  # noqa: BLE001
        row.capture = _first_sentence(err)
        return row
    row.capture = "ok"
    regions = find_regions(gm)
    row.attention = _with_reasons(_per_layer(len(regions.attention)), regions.failures, ("attention", "block"))
    moe = getattr(regions, "moe", [])  # MoE blocks are FFN regions of their own
    row.ffn = _with_reasons(_per_layer(len(regions.ffn) + len(moe)), regions.failures, ("ffn", "moe"))
    row.ffn += f" ({len(moe)} MoE)" if moe else ""
    try:
        fused = condfx.apply(gm, "fuse-attention").graph_module
        other = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (model(other) - fused(other)).abs().max().item()
        row.fuse_attention = f"ok {diff:.1e}" if diff <= EXACT_TOL else f"max diff {diff:.1e}"
    except Exception as err:  # noqa: BLE001
        row.fuse_attention = _first_sentence(err)
    if passes:
        row.passes = {name: _pass_cell(gm, spec) for name, spec in PASS_SPECS.items()}
    return row


def conformance_row(model_type: str, attn: str, passes: bool = True) -> Row:
    """Builds ``model_type`` small with ``attn`` and measures it (build failures become the row).

    ``attn="auto"`` tries SDPA and falls back to eager when the class does not offer SDPA.
    """
    start = time.perf_counter()
    row = Row(model_type, "sdpa" if attn == "auto" else attn)
    try:
        model = build_small(model_type, row.attn)
    except Exception as err:  # noqa: BLE001
        row.build = _first_sentence(err)
        if attn != "auto" or "scaled_dot_product_attention" not in str(err):
            return row
        row.attn, row.build = "eager", "ok"
        try:
            model = build_small(model_type, "eager")
        except Exception as err2:  # noqa: BLE001
            row.build = _first_sentence(err2)
            return row
    measure(model, row, passes)
    row.seconds = round(time.perf_counter() - start, 2)
    return row


def _timed_row(model_type: str, attn: str, passes: bool, seconds: int) -> Row:
    """``conformance_row`` cut off after ``seconds`` (SIGALRM; the row then says so)."""

    def _stop(signum, frame):
        msg = f"row took over {seconds} s"
        raise TimeoutError(msg)

    previous = signal.signal(signal.SIGALRM, _stop)
    signal.alarm(seconds)
    try:
        return conformance_row(model_type, attn, passes)
    except TimeoutError as err:
        return Row(model_type, attn, build=str(err))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def model_types() -> list[str]:
    """Every model type with a causal LM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def markdown(rows: list[Row]) -> str:
    """The table: one line per row, green cells as "ok ...", others with the reason."""
    head = ["model", "attn", "build", "capture", "attention", "ffn", "fuse-attention", *PASS_SPECS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model_type, r.attn, r.build, r.capture, r.attention, r.ffn, r.fuse_attention,
                 *(r.passes.get(p, "") for p in PASS_SPECS)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> dict[str, int]:
    """Counts over the built rows: green per column, all-green rows."""
    built = [r for r in rows if r.build == "ok"]
    out = {"rows": len(rows), "built": len(built), "all_green": sum(r.green() for r in built)}
    for col in ("capture", "attention", "ffn", "fuse_attention"):
        out[col] = sum(getattr(r, col).startswith("ok") for r in built)
    for name in PASS_SPECS:
        out[name] = sum(r.passes.get(name, "").startswith("ok") for r in built)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--attn", default="sdpa,eager",
                        help="attention implementations to try; 'auto': SDPA, eager where SDPA is not offered")
    parser.add_argument("--row-timeout", type=int, default=90, help="seconds per row before it is cut off")
    parser.add_argument("--jsonl", default="", help="also append each row to this file as it is measured")
    parser.add_argument("--no-passes", action="store_true", help="skip the four lossy passes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    types = args.only.split(",") if args.only else model_types()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        for kind in types:
            for attn in args.attn.split(","):
                rows.append(_timed_row(kind, attn, not args.no_passes, args.row_timeout))
                gc.collect()  # built models and graphs are garbage now; a full sweep holds ~190 of them
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(asdict(rows[-1])) + "\n")
                print(f"{kind} {attn}: {'green' if rows[-1].green() else 'not green'}", file=sys.stderr)
    if args.json:
        print(json.dumps({"summary": summary(rows), "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(markdown(rows))
        print()
        print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
