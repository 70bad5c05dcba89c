"""L2A models through the runtime: window ring cache + global KV cache, decode = full forward."""

from __future__ import annotations

import torch

import condfx
from condfx.eval.tasks import MQARConfig, build_mqar_model, make_mqar_batch
from condfx.l2a import record_route_stats
from condfx.patterns.routed import find_routed_layers
from condfx.runtime.caches import FullKVCache, SlidingWindowCache
from condfx.runtime.session import Session

TASK = MQARConfig(vocab_size=32, num_pairs=2, gap=8, seq_len=16)


def test_decode_matches_full_forward_and_pruning_drops_global_cache():
    model = build_mqar_model(TASK, dim=32).eval()
    pair, _ = make_mqar_batch(TASK, 2, torch.Generator().manual_seed(0))
    gm = condfx.capture(model, (pair,))  # batch 2: a batch of 1 would be specialised by export
    ids = pair[:1]
    routed = condfx.apply(gm, "route-attention{window=4}").graph_module
    with torch.no_grad():
        find_routed_layers(routed)[0].state.router_weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    record_route_stats(routed, [ids])
    pruned = condfx.apply(routed, "prune-global{max_fraction=0.999}").graph_module
    sizes = {}
    for name, g in (("routed", routed), ("pruned", pruned)):
        session = Session.from_graph(condfx.apply(g, "add-kv-cache").graph_module)
        full = g(ids)
        logits = [session.prefill(ids[:, :10])[:, -1]]
        logits += [session.step(ids[:, i : i + 1])[:, -1] for i in range(10, 16)]
        torch.testing.assert_close(torch.stack(logits[:-1], 1), full[:, 9:15], atol=1e-5, rtol=1e-5)
        kinds = [type(c) for c in session.caches.caches]
        sizes[name] = (kinds, session.cache_bytes())
        assert all(c.stored <= 3 for c in session.caches.caches if isinstance(c, SlidingWindowCache))
    assert sizes["routed"][0] == [SlidingWindowCache, FullKVCache, SlidingWindowCache, FullKVCache]
    assert sizes["pruned"][0] == [SlidingWindowCache, SlidingWindowCache, FullKVCache]
    assert sizes["pruned"][1] < sizes["routed"][1]
