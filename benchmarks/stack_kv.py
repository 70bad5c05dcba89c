"""The stack's KV cache measured: route-attention + prune-global + quantize-kv{kivi} + skip-ffn in one
decode graph, run by a PyTorch Session and an ONNX Runtime Session on stories260K.

For dense attention, route-attention + KIVI, and the stack, a 480-token prompt of
tinystories_valid_head.txt is prefilled and 32 tokens are decoded greedily by both Sessions, each
carrying its own cache. Printed: bytes per token measured from the PyTorch Session's cache tensors
(``Session.cache_bytes()`` / position) against a dense float16 cache (640 B/token), whether the two
greedy sequences are equal, the free-running max |logit| difference (a float rounding difference on a
quantization boundary flips a code, and the two caches then differ for good; see kv_quant_onnx.py),
the max |logit| difference of one more step with both fed the PyTorch Session's cache,
and quantize-kv's report at its context (from the cache layouts). The routers are untrained (they
route every query); layers 1 and 3 are given routing statistics below 5% so that prune-global drops
their global branch, as calibration on a trained router would.

    python benchmarks/stack_kv.py
"""

from __future__ import annotations

import argparse

import torch

import condfx
from condfx.data import data_file
from condfx.l2a import record_route_stats
from condfx.models_zoo import load
from condfx.patterns.routed import find_routed_layers
from condfx.runtime.onnx_backend import OnnxBackend
from condfx.runtime.session import Session, TorchBackend

WINDOW, PROMPT, NEW, DENSE_FP16 = 64, 480, 32, 640
KV = "quantize-kv{method=kivi,bits=4,group=32,residual=32}"


def _greedy(session: Session, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    logits = [session.prefill(prompt)[:, -1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(NEW - 1):
        logits.append(session.step(torch.tensor([[tokens[-1]]]))[:, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load(data_file("stories260K.bin"))
    text = data_file("tinystories_valid_head.txt").read_text(encoding="utf-8")
    ids = torch.tensor([tok.encode(text[:6000], bos=True, eos=False)[:PROMPT]])
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    routed = condfx.apply(gm, f"route-attention{{window={WINDOW}}}").graph_module
    record_route_stats(routed, [ids[:, :256]])
    with torch.no_grad():
        for r in find_routed_layers(routed):
            if r.layer in (1, 3):
                r.state.route_stats.copy_(torch.tensor([1.0, 100.0], dtype=torch.float64))
    cases = {
        "dense (fuse-attention)": condfx.apply(gm, "fuse-attention"),
        "route-attention + kivi": condfx.apply(routed, KV),
        "stack": condfx.apply(routed, f"prune-global{{max_fraction=0.05}}, {KV}, skip-ffn{{threshold=0.5}}"),
    }
    for name, result in cases.items():
        decode = condfx.apply(result.graph_module, "add-kv-cache").graph_module
        torch_s, onnx_s = Session(TorchBackend(decode)), Session(OnnxBackend.from_graph(decode))
        t_tokens, t_logits = _greedy(torch_s, ids)
        o_tokens, o_logits = _greedy(onnx_s, ids)
        nxt, past = torch.tensor([[t_tokens[-1]]]), torch_s.caches.past()  # one step, same cache contents
        same = (torch_s.backend.run(nxt, past)[0] - onnx_s.backend.run(nxt, past)[0]).abs().max().item()
        per_token = torch_s.cache_bytes() / torch_s.position
        reports = [r for r in result.reports if hasattr(r, "kv_bytes_per_token")]
        extra = (f"; report at {reports[0].context}: {reports[0].kv_bytes_per_token:.1f} B/token"
                 if reports else "")
        print(f"{name}: {per_token:.1f} B/token at {torch_s.position} tokens ({DENSE_FP16 / per_token:.2f}x "
              f"below fp16 {DENSE_FP16}); greedy equal {t_tokens == o_tokens}; free-running max|logit diff| "
              f"{(t_logits - o_logits).abs().max().item():.2e}; same cache contents {same:.1e}{extra}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
