"""condfx.runtime: sessions, typed caches and the generation loop (the only layer that launches anything).

session = Session.from_model(model)                  # capture, fuse-attention, add-kv-cache
logits = session.prefill(ids); logits = session.step(next_ids)
tokens = generate(session, ["Once upon"], tokenizer=tok, max_new_tokens=20, top_p=0.9, seed=0)
"""

from condfx.runtime.caches import CacheSet, FullKVCache, LayerCache, SlidingWindowCache
from condfx.runtime.generate import generate
from condfx.runtime.sampling import SamplingConfig, filter_logits, sample_next
from condfx.runtime.session import BackendKind, DecodeBackend, Session, TorchBackend

__all__ = [
    "BackendKind",
    "CacheSet",
    "DecodeBackend",
    "FullKVCache",
    "LayerCache",
    "SamplingConfig",
    "Session",
    "SlidingWindowCache",
    "TorchBackend",
    "filter_logits",
    "generate",
    "sample_next",
]
