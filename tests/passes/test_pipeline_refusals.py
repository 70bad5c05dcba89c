"""Pipeline refusals of silent no-ops: a pass that rewrote nothing (unless ``allow_partial``), a pass
after ``add-kv-cache``, two conflicting ``quantize-kv`` / ``skip-ffn``, out-of-range ``layers``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx

import condfx
from condfx.passes import GraphSnapshot, Pass, PassError, PassResult, apply
from tests._helpers import ToyStack

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class _NoConfig:
    pass


class _SkipsAll(Pass):
    """Matches three layers and skips each (two reasons), rewriting nothing."""

    name: ClassVar[str] = "skips-all"
    config_class: ClassVar[type] = _NoConfig

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        skipped = (("no residual add", "layer 0"), ("no residual add", "layer 2"), ("k/v not found", "layer 1"))
        report = GraphSnapshot.take(gm).report(gm, self.name, matched=3, skipped=skipped)
        return PassResult(gm, False, report)


@functools.cache
def _toy() -> fx.GraphModule:
    torch.manual_seed(0)
    model = ToyStack(layers=2, form="eager", window=3).eval()
    return condfx.capture(model, (torch.randn(2, 5, 16),))


def test_rejects_pass_that_rewrote_nothing_listing_reasons_per_layer():
    with pytest.raises(PassError, match=r"skips-all matched 3 but rewrote none: no residual add \(layer 0, "
                                        r"layer 2\); k/v not found \(layer 1\); pass allow_partial=True"):
        apply(_toy(), [_SkipsAll()])


def test_matches_allow_partial_keeps_a_pass_that_rewrote_nothing():
    result = apply(_toy(), [_SkipsAll()], allow_partial=True)
    assert not result.modified and result.reports[0].skip_counts() == {"no residual add": 2, "k/v not found": 1}
    with pytest.raises(TypeError, match=r"allow_partial must be True or False; got 'yes'"):
        apply(_toy(), [_SkipsAll()], allow_partial="yes")


def test_matches_second_fuse_attention_already_fused_is_no_error():
    once = apply(_toy(), "fuse-attention").graph_module
    assert not apply(once, "fuse-attention").modified


def test_rejects_any_pass_after_add_kv_cache_naming_both():
    with pytest.raises(PassError, match=r"pass 'fuse-attention' failed \(passes run before it: fuse-attention, "
                                        r"add-kv-cache\): fuse-attention cannot run after add-kv-cache \(run before "
                                        r"it\): the graph is in decode form"):
        apply(_toy(), "fuse-attention, add-kv-cache, fuse-attention")
    decode = apply(_toy(), "fuse-attention, add-kv-cache").graph_module
    with pytest.raises(PassError, match=r"add-kv-cache cannot run after add-kv-cache \(the input graph\)"):
        apply(decode, "add-kv-cache")


@pytest.mark.parametrize(("spec", "first", "second"), [
    ("quantize-kv, quantize-kv{method=kivi}", r"quantize-kv \(pass 1\)", r"quantize-kv\{method=kivi\} \(pass 2\)"),
    ("fuse-attention, skip-ffn, skip-ffn{warmup=4}", r"skip-ffn \(pass 2\)", r"skip-ffn\{warmup=4\} \(pass 3\)"),
])
def test_rejects_second_conflicting_pass_before_any_runs(spec, first, second):
    with pytest.raises(PassError, match=rf"{second} conflicts with {first}: both rewrite every layer"):
        apply(_toy(), spec)


def test_rejects_out_of_range_layers_naming_the_valid_range():
    with pytest.raises(PassError, match=r"fuse-attention: layers \[99\] are out of range; the graph has 2 "
                                        r"attention layers \(valid indices 0\.\.1\)"):
        apply(_toy(), "fuse-attention{layers=[0,99]}")
