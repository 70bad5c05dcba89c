"""Quantized KV caches in real decoding: tokens/s, cache bytes and decode-step peak memory of the
whole model per cache, at 4K and 8K context, all caches in one run, with the time of a step split
into its parts (the dequantize/requantize of the packed streams and XQuant's rematerialisation
shown separately).

Each cache is a ``Session.from_model(model, passes=...)`` on the same model (SmolLM2-135M, real
weights from the GGUF, 30 layers unless ``--layers``; batch 1, float32 compute):
    fp32     ``fuse-attention``: plain float32 K/V, concatenated in the graph every step
    fp16     ``quantize-kv{method=kivi,bits=16}``: K/V stored float16 (``Float16KVCache``), the
             baseline of the ratio columns
    kivi     ``quantize-kv{method=kivi,bits=B}``: packed K per channel / V per token, read and
             updated by the graph (``condfx::kivi_cache_attention``)
    xquant   ``quantize-kv{method=xquant,bits=B}``: packed SVD latents (``condfx::quantized_stream``)
             and the layer's k/v path re-run over every cached token, twice (stored and
             quantize-dequantized latents)
Per context, every session is prefilled with the same random token ids (in chunks of ``--chunk``
tokens; the context limit of the model, 8192, is lifted so that 8192 + the decode steps fit:
RoPE positions are computed, not looked up), then ``--rounds`` rounds each time ``--steps``
one-token steps of every cache in turn (round-robin, so load noise hits all alike); tok/s is 1 /
the median step time.

Columns:
    cache MB     ``Session.cache_bytes()`` after the last step: every codes / scale / zero / fp tensor
    step peak MB the peak resident memory a decode step adds on top of the process before it: in a
                 child forked after the timing (a fresh process holding the same state), one step runs
                 (to fault back in the code pages the fork shares lazily), freed heap is returned to
                 the OS (``malloc_trim``), the peak-RSS mark is reset (``/proc/self/clear_refs``),
                 ``--mem-steps`` steps run, and VmHWM - VmRSS(before) is
                 the answer: the transient buffers of a step (dequantized / rematerialised K/V,
                 attention scratch, the cache copy being written), not the weights or the cache held
    split        ms of one step by part, from ``--profile-steps`` further steps run node by node
                 (``torch.fx.Interpreter``, each node timed including the interpreter's fetching of
                 its arguments, a few µs per node that falls mostly on ``model``, the part with the
                 most nodes; so the parts need not sum to the step time): ``model`` projections, norms,
                 MLP, RoPE of the new token, logits; ``cache io`` the Session's past()/update() (fp16:
                 the float16 <-> float32 casts) and the graph's concatenation of past and new K/V;
                 ``stream`` the dequantize of the packed codes + quantize of the tokens leaving the
                 residual window (KIVI: the ``stream_step`` calls inside ``kivi_cache_attention``,
                 timed by wrapping them); ``remat`` XQuant's copies of the k/v path over every cached
                 token (latent up-projection and RoPE, twice); ``attention`` the attention op itself.
CPU figures (a shared 2-core machine, one thread) are ratios to fp16 within one run. The fp16
baseline is the ``quantize-kv{bits=16}`` graph as it runs today: its Session casts the whole cache
float16 -> float32 and back every step, and its attention op reads 2S keys under a mask (the
full-precision and "quantized" copies), so it is slower than the plain fp32 path; fp32 is there
to show that. Step peak MB is process RSS: it includes what glibc malloc keeps between layers of
a step, not only the live tensors.

    python benchmarks/kv_quant_decode.py [--contexts 4096,8192] [--layers 30] [--steps 8]
        [--rounds 3] [--bits 2] [--group 64] [--residual 32] [--json] [--plot PNG]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch import fx, nn

import condfx.ops.kivi_cache as kivi_ops
from condfx.data import data_file
from condfx.models_zoo import load
from condfx.runtime.caches import append_kv
from condfx.runtime.session import Session, decode_attention

CACHES = ("fp32", "fp16", "kivi", "xquant")
PARTS = ("model", "cache io", "stream", "remat", "attention")


def _spec(cache: str, args) -> str:
    if cache == "fp32":
        return "fuse-attention"
    method, bits = ("kivi", 16) if cache == "fp16" else (cache, args.bits)
    return (f"fuse-attention, quantize-kv{{method={method},bits={bits},group={args.group},"
            f"residual={args.residual},sink={args.sink}}}")


def _cut_layers(model: nn.Module, n: int | None) -> None:
    """Keeps the first ``n`` decoder layers of a Hugging Face model (``--layers``)."""
    if n is None:
        return
    from condfx.models_zoo.hf import info_from_hf_config

    hf = model.hf
    if not 1 <= n <= len(hf.model.layers):
        msg = f"--layers must be between 1 and {len(hf.model.layers)}; got {n}."
        raise ValueError(msg)
    hf.model.layers = nn.ModuleList(list(hf.model.layers)[:n])
    hf.config.num_hidden_layers = n
    model.info = info_from_hf_config(hf.config, model.info.name)


def _upstream(roots, stop: set) -> set:
    """Nodes ``roots`` are computed from (themselves included), not walking past ``stop``."""
    seen, stack = set(), [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(() if n in stop else n.all_input_nodes)
    return seen


def _node_parts(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """The part of a step each node of the decode graph belongs to (see the module docstring).

    XQuant's ``remat``: for each attention node of a graph with ``quantized_stream`` nodes, what its
    k, v, k̂, v̂ are computed from (not walking past a stream node) and its query is not: the copied
    k/v path over the N cached tokens, including the RoPE tables of those N positions.
    """
    ops = torch.ops.condfx
    attn = {ops.attention.default, ops.quantized_cache_attention.default, ops.kivi_cache_attention.default,
            decode_attention}
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    parts: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.target is ops.quantized_stream.default:
            parts[node] = "stream"
        elif node.target in attn:
            parts[node] = "attention"
        elif node.target in (torch.ops.aten.cat.default, torch.cat, append_kv) and placeholders & set(node.all_input_nodes):
            parts[node] = "cache io"
    streams = {n for n, p in parts.items() if p == "stream"}
    if not streams:
        return parts
    for node in [n for n, p in parts.items() if p == "attention"]:
        kv = _upstream(node.args[1:5], streams)
        query = _upstream([node.args[0]], streams)
        parts.update(dict.fromkeys((n for n in kv - query if n.op == "call_function" and n not in parts),
                                   "remat"))
    return parts


class _TimedGraph(fx.Interpreter):
    """Runs a decode graph node by node, adding each node's time to its part."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.parts = _node_parts(gm)
        self.seconds: dict[str, float] = defaultdict(float)
        self.inner = 0.0  # stream_step time inside kivi_cache_attention, set by the wrapper

    def run_node(self, n: fx.Node):
        self.inner = 0.0
        t0 = time.perf_counter()
        out = super().run_node(n)
        took = time.perf_counter() - t0
        self.seconds["stream"] += self.inner
        self.seconds[self.parts.get(n, "model")] += took - self.inner
        return out


@contextlib.contextmanager
def _time_kivi_streams(timer: _TimedGraph):
    """Wraps ``kivi_cache_attention``'s ``stream_step`` so its time counts as ``stream``."""
    original = kivi_ops.stream_step

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = original(*a, **kw)
        timer.inner += time.perf_counter() - t0
        return out

    kivi_ops.stream_step = timed
    try:
        yield
    finally:
        kivi_ops.stream_step = original


def _split_ms(session: Session, ids: torch.Tensor, steps: int) -> dict[str, float]:
    """ms per step by part, over ``steps`` real decode steps run node by node (none when ``steps`` is 0)."""
    if steps <= 0:
        return {}
    timer = _TimedGraph(session.backend.runner)  # what the Session runs (K/V grown in place)
    io = 0.0
    with _time_kivi_streams(timer), torch.no_grad():
        for i in range(steps):
            t0 = time.perf_counter()
            past = session.caches.past()
            io += time.perf_counter() - t0
            out = timer.run(ids[:, i : i + 1], *past)
            t0 = time.perf_counter()
            session.caches.update(list(out[1:]))
            io += time.perf_counter() - t0
    timer.seconds["cache io"] += io
    return {p: 1000 * timer.seconds[p] / steps for p in PARTS}


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    msg = f"/proc/self/status has no {field} line."
    raise RuntimeError(msg)


def _step_peak_bytes(session: Session, ids: torch.Tensor, steps: int) -> int:
    """Peak RSS a decode step adds, measured in a forked child (see the module docstring)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report through the pipe, exit without cleanup
        result = {}
        try:
            os.close(read)
            session.step(ids[:, :1])  # faults the code pages back in: a fork shares them lazily
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            before = _status_kb("VmRSS")
            for i in range(1, 1 + steps):
                session.step(ids[:, i : i + 1])
            result = {"bytes": 1024 * (_status_kb("VmHWM") - before)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.write(write, json.dumps(result).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = json.loads(f.read() or b"{}")
    os.waitpid(pid, 0)
    if "bytes" not in result:
        msg = f"the memory child failed: {result.get('error', 'no result')}."
        raise RuntimeError(msg)
    return int(result["bytes"])


def _prefill(session: Session, ids: torch.Tensor, chunk: int) -> float:
    t0 = time.perf_counter()
    session.prefill(ids[:, :chunk])
    for start in range(chunk, ids.shape[1], chunk):
        session.step(ids[:, start : start + chunk])
    return time.perf_counter() - t0


def _context_rows(sessions: dict[str, Session], context: int, vocab: int, args) -> list[dict]:
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, vocab, (1, context), generator=gen)
    extra = max(args.profile_steps, 1 + args.mem_steps)  # both start after the timed steps
    new = torch.randint(0, vocab, (1, 1 + args.rounds * args.steps + extra), generator=gen)
    prefill_s = {}
    for name, s in sessions.items():
        prefill_s[name] = _prefill(s, ids, args.chunk)
        s.step(new[:, :1])  # warm-up
        print(f"{context} {name}: prefill {prefill_s[name]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    at = 1
    for _ in range(args.rounds):
        for name, s in sessions.items():
            for i in range(args.steps):
                t0 = time.perf_counter()
                s.step(new[:, at + i : at + i + 1])
                times[name].append(time.perf_counter() - t0)
        at += args.steps
    rows = []
    for name, s in sessions.items():
        split = _split_ms(s, new[:, at:], args.profile_steps)
        peak = _step_peak_bytes(s, new[:, at:], args.mem_steps) if args.mem_steps else None
        ms = 1000 * statistics.median(times[name])
        rows.append({"context": context, "cache": name, "ms_per_token": ms, "tok_s": 1000 / ms,
                     "step_ms_min": 1000 * min(times[name]), "prefill_s": prefill_s[name],
                     "cache_bytes": s.cache_bytes(), "tokens_cached": s.position,
                     "step_peak_bytes": peak, "split_ms": split})
        print(f"{context} {name}: {ms:.1f} ms/token, split "
              + ", ".join(f"{p} {v:.1f}" for p, v in split.items()), file=sys.stderr, flush=True)
    base = next(r for r in rows if r["cache"] == "fp16")
    for r in rows:
        r["speed_vs_fp16"] = base["ms_per_token"] / r["ms_per_token"]
        r["memory_vs_fp16"] = base["cache_bytes"] / r["cache_bytes"]
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load(args.model or str(data_file("SmolLM2-135M-Instruct.Q4_1.gguf")))
    model.eval()
    _cut_layers(model, args.layers)
    sessions = {}
    for name in args.caches.split(","):
        if name not in CACHES:
            msg = f"--caches entries must be among {', '.join(CACHES)}; got {name!r}."
            raise ValueError(msg)
        t0 = time.perf_counter()
        sessions[name] = Session.from_model(model, passes=_spec(name, args))
        sessions[name].max_seq_len = None  # 8192 + the decode steps (see the module docstring)
        print(f"{name}: session built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if "fp16" not in sessions:
        msg = "--caches must include fp16, the baseline of the ratios."
        raise ValueError(msg)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        rows += _context_rows(sessions, context, model.info.vocab_size, args)
    return {"model": model.info.name, "layers": model.info.n_layers, "bits": args.bits,
            "group": args.group, "residual": args.residual, "sink": args.sink,
            "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
            "specs": {name: _spec(name, args) for name in sessions}, "rows": rows}


def _plot(result: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["cache"] for r in result["rows"]):
        pts = [(r["context"], r["tok_s"]) for r in result["rows"] if r["cache"] == name]
        label = name if name in ("fp32", "fp16") else f"{name} {result['bits']}-bit"
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (batch 1, 1 CPU thread)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"{result['model']}, {result['layers']} layers\ndecode speed per KV cache (same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(result: dict) -> str:
    lines = [
        "| context | cache | tok/s | vs fp16 | cache MB | vs fp16 | step peak MB | model | cache io "
        "| stream | remat | attention |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peak = "-" if r["step_peak_bytes"] is None else f"{r['step_peak_bytes'] / 2**20:.1f}"
        split = " | ".join(f"{r['split_ms'][p]:.1f}" if r["split_ms"] else "-" for p in PARTS)
        lines.append(
            f"| {r['context']} | {r['cache']} | {r['tok_s']:.2f} | {r['speed_vs_fp16']:.2f}x "
            f"| {r['cache_bytes'] / 2**20:.1f} | {r['memory_vs_fp16']:.2f}x smaller | {peak} | {split} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF / zoo model (default: SmolLM2-135M GGUF)")
    parser.add_argument("--caches", default=",".join(CACHES))
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--residual", type=int, default=32)
    parser.add_argument("--sink", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per cache per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--mem-steps", type=int, default=2, help="0: skip the memory child")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", default=None, help="write tokens/s vs context to this PNG")
    parser.add_argument("--from-json", default=None, help="print / plot a saved --json result")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            result = json.load(f)
    else:
        result = run(args)
    if args.plot:
        _plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{result['model']}, {result['layers']} layers, {result['bits']}-bit g{result['group']} "
          f"residual {result['residual']}, {result['threads']} thread(s); split: ms per step")
    print(_table(result))


if __name__ == "__main__":
    main()
