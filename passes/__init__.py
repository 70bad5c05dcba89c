"""condfx.passes: rewrite passes, their base classes, the registry and the pipeline."""

from condfx.passes.base import GraphSnapshot, Pass, PassError, PassReport, PassResult
from condfx.passes.fuse_attention import FuseAttention, FuseAttentionConfig
from condfx.passes.pipeline import PassSpec, PipelineResult, apply, load_spec, parse_spec
from condfx.passes.registry import PASSES, get_pass_class
from condfx.passes.report import CostEstimate, estimate_cost

__all__ = [
    "PASSES",
    "CostEstimate",
    "FuseAttention",
    "FuseAttentionConfig",
    "GraphSnapshot",
    "Pass",
    "PassError",
    "PassReport",
    "PassResult",
    "PassSpec",
    "PipelineResult",
    "apply",
    "estimate_cost",
    "get_pass_class",
    "load_spec",
    "parse_spec",
]
