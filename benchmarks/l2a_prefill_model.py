"""L2A whole-model prefill on a SmolLM2-shaped model (random weights): time and KV bytes per token.

Model: zoo Llama with SmolLM2-135M's shapes (hidden 576, 9 query / 3 KV heads, head_dim 64, SwiGLU
1536, RoPE theta 100000) and ``--layers`` blocks (30 in SmolLM2), random weights (speed and cache
size do not depend on the values). The vocabulary is cut to ``--vocab`` (512) so the LM head, which
costs the same in both models and of which time-to-first-token needs only the last row, does not
dominate the timing. Batch 1, float32, ``--threads`` torch threads.

    dense   ``fuse-attention``: causal SDPA (PyTorch's CPU flash kernel) in every layer
    select  (``--form select``, the default) ``route-attention{form=select,window,sink}`` in every
            layer with the routes forced (``condfx.l2a_retrofit.forced_routes``): a random ``--routed``
            fraction of the queries per layer runs full causal attention (``condfx.routed_attention``
            on those rows only), the rest the window + sink attention of the same q/k/v; q/k/v/o are
            projected once for all tokens, as in the dense model, so the saving is the attention core.
    L2A     (``--form add``) ``route-attention{window}`` in every layer with the routes forced: each router weight is
            a random direction (scaled so logit/temperature ~ N(0, 1)) and the routing threshold of
            the ``logit >= 0`` node is moved to the (1 - ``--routed``) quantile of that layer's
            logits on the first 2,048 tokens of the input (equivalent to a router bias), layer by
            layer, so about ``--routed`` of the queries go global in every layer.

Both run the same input in the same run, interleaved (one call of each per round); best of ``--reps``. KV bytes per token: runtime
``Session`` caches (``add-kv-cache``) after a ``--kv-context``-token prefill, for dense, L2A, and L2A
after ``record_route_stats`` + ``prune-global{max_fraction=1,layers=<first half>}`` (half the layers
lose their global branch and keep only the window ring cache); ``--form add`` only. ``--device cuda``
registers the Triton kernels and times in ``--dtype`` with CUDA synchronisation.

    nice python benchmarks/l2a_prefill_model.py [--layers 30] [--lengths 4096,8192] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import condfx
from condfx.l2a import l2a_view, record_route_stats, route_fractions
from condfx.l2a_retrofit import forced_routes, select_layers, set_forced_routes
from condfx.models_zoo.llama import LlamaConfig, LlamaModel
from condfx.patterns.routed import find_routed_layers
from condfx.runtime.session import Session

CALIB = 2048


def smollm2_shaped(layers: int, vocab: int) -> LlamaModel:
    cfg = LlamaConfig(vocab_size=vocab, dim=576, n_layers=layers, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                      max_seq_len=16384, rope_theta=100000.0, tie_embeddings=True)
    return LlamaModel(cfg, seed=0).eval()


def force_routes(gm, ids: torch.Tensor, routed: float, temperature: float = 0.1) -> list[float]:
    """Sets every L2A layer to route about ``routed`` of the queries of ``ids`` (see the docstring)."""
    layers = find_routed_layers(gm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            w = torch.randn(layer.state.router_weight.shape, generator=g)
            layer.state.router_weight.copy_(w / w.norm() * temperature)
        for i, layer in enumerate(layers):  # layer by layer: a threshold changes the later layers' inputs
            prob = l2a_view(gm, "prob")(ids)[1 + i].flatten()
            p = torch.quantile(prob.double(), 1.0 - routed).clamp(1e-6, 1 - 1e-6)
            node = layer.nodes["route"]
            node.args = (node.args[0], float(temperature * torch.log(p / (1 - p))))
            gm.recompile()
    return route_fractions(gm, ids)


def forced_select(gm, tokens: int, routed: float):
    """form=select with every layer's routes forced to a random ``routed`` fraction of the queries
    (``condfx.l2a_retrofit.forced_routes``: the route mask is read from a buffer, the router head,
    one d-vector dot per token, is not run); the masks are kept in ``meta["routes"]``."""
    forced = forced_routes(gm)
    g = torch.Generator().manual_seed(1)
    forced.meta["routes"] = [torch.rand(1, tokens, generator=g) < routed for _ in select_layers(forced)]
    return forced


def kv_bytes_per_token(gm, ids: torch.Tensor) -> float:
    session = Session.from_graph(condfx.apply(gm, "add-kv-cache").graph_module)
    with torch.no_grad():
        session.prefill(ids)
    return session.cache_bytes() / ids.shape[1]


def run(args) -> dict:
    t0 = time.perf_counter()
    model = smollm2_shaped(args.layers, args.vocab)
    lengths = [int(t) for t in args.lengths.split(",")]
    ids = torch.randint(0, args.vocab, (1, max(lengths + [args.kv_context])), generator=torch.Generator().manual_seed(0))
    gm = condfx.capture(model, (ids[:, :32].reshape(2, 16),))  # batch 2: keeps the batch dim symbolic
    dense = condfx.apply(gm, "fuse-attention").graph_module
    calib = ids[:, :CALIB]
    if args.form == "select":
        spec = f"route-attention{{form=select,window={args.window},sink={args.sink},correct={args.correct}}}"
        l2a = condfx.apply(gm, spec).graph_module
        l2a, fractions = forced_select(l2a, max(lengths), args.routed), [args.routed] * args.layers
    else:
        l2a = condfx.apply(gm, f"route-attention{{window={args.window}}}").graph_module
        fractions = force_routes(l2a, calib, args.routed)
    if args.device != "cpu":
        from condfx.codegen.triton.attention import register

        register()  # the Triton kernels of condfx::attention and condfx::routed_attention
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        dense, l2a, ids = dense.to(args.device, dtype), l2a.to(args.device, dtype), ids.to(args.device)

    def timed(fns, x):
        """Best wall time of each of ``fns`` over ``--reps`` rounds, one call of each per round
        (interleaved, so a shared machine's slow spells hit both models alike)."""
        def call(fn):
            t0 = time.perf_counter()
            fn(x)
            if args.device != "cpu":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        for fn in fns:
            call(fn)  # warm-up
        best = [float("inf")] * len(fns)
        for _ in range(args.reps):
            best = [min(b, call(fn)) for b, fn in zip(best, fns, strict=True)]
        return best

    rows = []
    with torch.no_grad():
        for t in lengths:
            if args.form == "select":
                set_forced_routes(l2a, [r[:, :t] for r in l2a.meta["routes"]])
            d, r = timed([dense, l2a], ids[:, :t])
            rows.append({"T": t, "dense_s": d, "l2a_s": r, "speedup": d / r})
            if not args.json:
                print(f"  T={t}: dense {d:.2f}s, L2A {r:.2f}s, {d / r:.2f}x", flush=True)
    kv = {}
    if args.kv_context and args.form == "add":
        x = ids[:, : args.kv_context]
        record_route_stats(l2a, [calib])
        half = list(range(args.layers // 2))
        pruned = condfx.apply(l2a, f"prune-global{{max_fraction=1.0,layers={half}}}").graph_module
        kv = {"dense": kv_bytes_per_token(dense, x), "L2A": kv_bytes_per_token(l2a, x),
              "L2A pruned": kv_bytes_per_token(pruned, x), "pruned_layers": half,
              "global_layers_left": [r.layer for r in find_routed_layers(pruned)]}
    return {"layers": args.layers, "vocab": args.vocab, "window": args.window, "form": args.form,
            "device": args.device, "threads": torch.get_num_threads(),
            "routed_target": args.routed, "routed_per_layer_calib": fractions, "rows": rows,
            "kv_context": args.kv_context, "kv_bytes_per_token": kv, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--form", choices=("add", "select"), default="select",
                        help="route-attention form: select (the retrofit; routes forced) or add (the paper's)")
    parser.add_argument("--sink", type=int, default=4, help="form=select: sink tokens of the window branch")
    parser.add_argument("--correct", type=int, default=0,
                        help="form=select: rank of the window correction (0: none, the pass default)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (Triton kernels registered)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="on a GPU")
    parser.add_argument("--routed", type=float, default=0.2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--kv-context", type=int, default=8192, help="0 skips the KV measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    fr = out["routed_per_layer_calib"]
    print(f"SmolLM2-shaped, {out['layers']} layers, vocab {out['vocab']}, form={out['form']}, window {out['window']}, "
          f"threads {out['threads']}; routed per layer {min(fr):.1%}..{max(fr):.1%} (mean {sum(fr) / len(fr):.1%})")
    print("| T | dense prefill s | L2A prefill s | speed-up |")
    print("|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['T']} | {r['dense_s']:.2f} | {r['l2a_s']:.2f} | {r['speedup']:.2f}x |")
    kv = out["kv_bytes_per_token"]
    if kv:
        print(f"KV bytes/token at {out['kv_context']}: dense {kv['dense']:.0f}, L2A {kv['L2A']:.0f}, "
              f"L2A with layers {kv['pruned_layers']} pruned {kv['L2A pruned']:.0f} "
              f"({1 - kv['L2A pruned'] / kv['L2A']:.1%} fewer than L2A, {1 - kv['L2A pruned'] / kv['dense']:.1%} fewer than dense)")


if __name__ == "__main__":
    main()
