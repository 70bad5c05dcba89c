"""Every registered pass on a float16, bfloat16 and float64 model: it applies (or refuses with one
sentence), the result runs and is finite, and exact passes stay within the dtype's tolerance."""

from __future__ import annotations

import re
from types import MappingProxyType

import pytest
import torch

import condfx
from condfx.l2a import record_route_stats
from condfx.models_zoo import build_zoo
from condfx.passes import PassError
from condfx.passes.registry import PASSES
from tests._helpers import TOLERANCES

# pass name -> (passes run first, its own spec with small options, exact?)
# Deselected by default (pyproject addopts: -m 'not slow'); run them with `python -m pytest -m slow`.
SLOW = [pytest.mark.slow]

_SPECS = MappingProxyType({
    "fuse-attention": ("", "fuse-attention", True),
    "add-kv-cache": ("fuse-attention", "add-kv-cache", True),
    "skip-ffn": ("", "skip-ffn{cold_start=0,cold_end=0}", False),
    "interleave-heads": ("", "interleave-heads", False),
    "fold-interleave": ("interleave-heads", "fold-interleave", False),
    "quantize-kv": ("", "quantize-kv{method=kivi,group=8}", False),
    "route-attention": ("", "route-attention{window=4}", False),
    "prune-global": ("route-attention{window=4}", "prune-global", False),
    "sink-window": ("", "sink-window{sink=1,window=4}", False),
})
_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
# In CI: float64 (whose new parameters once came out float32) through the passes that create tensors or
# read RoPE tables, and bfloat16 (the coarser half type) through the RoPE-frequency readers; every other
# cell is slow.
_CI = {torch.float64: {"fuse-attention", "skip-ffn", "interleave-heads", "quantize-kv", "route-attention",
                       "sink-window"},
       torch.bfloat16: {"interleave-heads", "sink-window"}, torch.float16: set()}
_DTYPES = (torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(scope="module")
def captured():
    """dtype -> (captured llama-tiny in that dtype, its logits on _IDS), built on first use."""
    built = {}

    def get(dtype):
        if dtype not in built:
            model = build_zoo("llama-tiny").to(dtype).eval()
            with torch.no_grad():
                want = model(_IDS)
            built[dtype] = condfx.capture(model, (_IDS,)), want
        return built[dtype]

    return get


def test_matches_every_registered_pass():
    assert set(_SPECS) == set(PASSES)


def _prepared(gm, before: str):
    if not before:
        return gm
    gm = condfx.apply(gm, before).graph_module
    if before.startswith("route-attention"):
        record_route_stats(gm, [_IDS])
    return gm


@pytest.mark.parametrize(("dtype", "name"), [
    pytest.param(dtype, name, marks=() if name in _CI[dtype] else SLOW, id=f"{dtype}-{name}")
    for dtype in _DTYPES for name in _SPECS])
def test_numerics_pass_runs_in_dtype(captured, dtype, name):
    gm, want = captured(dtype)
    before, spec, exact = _SPECS[name]
    try:
        out = condfx.apply(_prepared(gm, before), spec).graph_module
    except PassError as err:  # a refusal must be one sentence naming the pass
        assert re.fullmatch(r"pass '[^']+' failed .*[.:]", str(err).splitlines()[0]), err
        pytest.fail(f"{spec} refused a {want.dtype} model: {err}")
    past = [p for layout in out.meta.get("condfx_kv", ()) for p in layout.empty_past(_IDS.shape[0])]
    with torch.no_grad():
        got = out(_IDS, *past)
    got = got[0] if isinstance(got, tuple) else got
    assert got.dtype == want.dtype and bool(torch.isfinite(got).all())
    if exact:
        atol, rtol = TOLERANCES[want.dtype]
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
