"""Tests of the pass pipeline: spec text and files, option conversion, transactional apply."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx

import condfx
from condfx.graph_text import graph_text
from condfx.passes import GraphSnapshot, Pass, PassError, PassResult, apply, parse_spec
from condfx.passes.pipeline import build_passes, load_spec
from condfx.passes.registry import PASSES, get_pass_class
from tests._helpers import ToyStack


class _Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass(frozen=True)
class _ProbeConfig:
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    mode: _Mode = _Mode.FAST
    name: str = "x"
    layers: tuple[int, ...] | None = None
    pair: tuple[int, int] = (0, 0)
    limit: int | None = None


class _ScaleParams(Pass):
    """Doubles every parameter in place (on the pipeline's copy) and adds one node."""

    name: ClassVar[str] = "scale-params"
    config_class: ClassVar[type] = _ProbeConfig

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        snapshot = GraphSnapshot.take(gm)
        with torch.no_grad():
            for p in gm.parameters():
                p.mul_(2)
        return PassResult(gm, True, snapshot.report(gm, self.name, matched=1, rewritten=1))


class _BreakGraph(Pass):
    """Mutates the graph and the parameters, then fails."""

    name: ClassVar[str] = "break-graph"
    config_class: ClassVar[type] = _ProbeConfig

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        with torch.no_grad():
            next(gm.parameters()).zero_()
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = ((next(iter(gm.graph.nodes)),),)
        msg = "deliberate failure"
        raise RuntimeError(msg)


class _MatchNothing(Pass):
    name: ClassVar[str] = "match-nothing"
    config_class: ClassVar[type] = _ProbeConfig
    matches: ClassVar[str] = "attention region"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        report = GraphSnapshot.take(gm).report(gm, self.name, near_misses=("attention: no softmax at mm_3",))
        return PassResult(gm, False, report)


class _DropMeta(Pass):
    """Adds a node without FakeTensor metadata: breaks an invariant that ``ensures`` checks."""

    name: ClassVar[str] = "drop-meta"
    config_class: ClassVar[type] = _ProbeConfig

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten.neg.default, (out.args[0][0],))
        return PassResult(gm, True, GraphSnapshot.take(gm).report(gm, self.name, matched=1))


_REGISTRY = {p.name: p for p in (_ScaleParams, _BreakGraph, _MatchNothing, _DropMeta)}


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    return condfx.capture(ToyStack().eval(), (x,)), x


# ---- spec text ----


def test_matches_spec_with_options_lists_and_quotes():
    specs = parse_spec(" a-pass, b{x=1, y=[1, 2.5,true]} ,c{}, d{s='hi, there', t=\"{}\"}")
    assert [s.name for s in specs] == ["a-pass", "b", "c", "d"]
    assert [s.column for s in specs] == [2, 10, 35, 40]
    assert specs[1].options == {"x": "1", "y": ["1", "2.5", "true"]}
    assert specs[2].options == {} and specs[3].options == {"s": "hi, there", "t": "{}"}


@pytest.mark.parametrize(
    ("spec", "column", "expected"),
    [
        ("", 1, "a pass name"),
        ("a,", 3, "a pass name"),
        ("a b", 3, "',' between passes"),
        ("a{", 3, "an option name"),
        ("a{x}", 4, "'=' after option 'x'"),
        ("a{x=}", 5, "a value"),
        ("a{x=1", 6, "',' or '}'"),
        ("a{x=[1,2}", 9, "',' or ']'"),
        ("a{x=1,x=2}", 7, "a new option name (option 'x' is given twice)"),
        ("a{x='abc}", 10, "a closing '"),
        ("{x=1}", 1, "a pass name"),
        ("a{x=1}}", 7, "',' between passes"),
    ],
)
def test_rejects_malformed_spec_pointing_at_column(spec, column, expected):
    with pytest.raises(ValueError, match=rf"column {column}: expected {re.escape(expected)}") as info:
        parse_spec(spec)
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") == column + 1  # two spaces of indent


def test_rejects_unknown_pass_with_suggestion():
    with pytest.raises(ValueError, match=r"Unknown pass 'fuse-atention'; known passes: .*fuse-attention.*"
                       r"Did you mean 'fuse-attention'\?"):
        get_pass_class("fuse-atention")
    assert get_pass_class("fuse-attention") is PASSES["fuse-attention"]


def test_matches_options_converted_by_field_type():
    (p,) = build_passes(
        "scale-params{count=3, ratio=1e-2, flag=yes, mode=SLOW, name=abc, layers=[0,2], pair=[1,2], limit=none}",
        _REGISTRY,
    )
    assert p.config == _ProbeConfig(3, 0.01, True, _Mode.SLOW, "abc", (0, 2), (1, 2), None)
    (p,) = build_passes("scale-params{limit=7, mode=fast}", _REGISTRY)
    assert p.config.limit == 7 and p.config.mode is _Mode.FAST


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("count=1.5", r"scale-params option 'count' must be an int; got '1.5'"),
        ("flag=maybe", r"option 'flag' must be a bool \(true/false\); got 'maybe'"),
        ("mode=medium", r"option 'mode' must be one of \{fast, slow\}; got 'medium'"),
        ("layers=3", r"option 'layers' must be a list of ints like \[0, 1\] or none; got '3'"),
        ("pair=[1]", r"option 'pair' must be a list of ints"),
        ("name=[a]", r"option 'name' must be a string; got \['a'\]"),
        ("cuont=2", r"scale-params has no option 'cuont'; allowed options: count, .*Did you mean 'count'"),
    ],
)
def test_rejects_wrong_option_name_or_type(options, expected):
    with pytest.raises(ValueError, match=expected):
        build_passes(f"scale-params{{{options}}}", _REGISTRY)


def test_rejects_config_validation_with_pass_name():
    with pytest.raises(ValueError, match=r"fuse-attention: FuseAttentionConfig.layers must be a list"):
        build_passes("fuse-attention{layers=[-1]}")


# ---- spec files ----


def test_matches_json_spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps([{"name": "scale-params", "options": {"count": 2, "layers": [1]}},
                                {"match-nothing": {"flag": True}}, "break-graph"]))
    specs = load_spec(path)
    assert [s.name for s in specs] == ["scale-params", "match-nothing", "break-graph"]
    passes = build_passes(path, _REGISTRY)
    assert passes[0].config.count == 2 and passes[0].config.layers == (1,) and passes[1].config.flag


def test_matches_yaml_spec_file_mapping_form(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("scale-params:\n  ratio: 0.25\n  mode: slow\nmatch-nothing:\n")
    passes = build_passes(str(path), _REGISTRY)
    assert [p.name for p in passes] == ["scale-params", "match-nothing"]
    assert passes[0].config.ratio == 0.25 and passes[0].config.mode is _Mode.SLOW


def test_rejects_malformed_spec_file(tmp_path):
    path = tmp_path / "spec.yml"
    path.write_text("- [1, 2]\n")
    with pytest.raises(ValueError, match=r"spec.yml item 0 must be a pass name"):
        load_spec(path)
    other = tmp_path / "spec.txt"
    other.write_text("[]")
    with pytest.raises(ValueError, match=r"must end in .json, .yaml or .yml; got '.txt'"):
        load_spec(other)


# ---- transactional apply ----


def _params(gm):
    return {k: v.clone() for k, v in gm.state_dict().items()}


def test_matches_pipeline_on_a_copy_without_aliasing(captured):
    gm, x = captured
    text, params = graph_text(gm), _params(gm)
    result = apply(gm, "scale-params", registry=_REGISTRY)
    assert result.modified and result.graph_module is not gm
    assert graph_text(gm) == text
    for key, value in gm.state_dict().items():
        torch.testing.assert_close(value, params[key], atol=0, rtol=0)
        assert value.data_ptr() != result.graph_module.state_dict()[key].data_ptr()
    assert "val" in next(iter(result.graph_module.graph.nodes)).meta  # FakeTensor meta survives the copy


def test_rejects_failing_pass_leaving_caller_untouched(captured):
    gm, x = captured
    text, params, before = graph_text(gm), _params(gm), gm(x)
    with pytest.raises(PassError) as info:
        apply(gm, "scale-params, scale-params{count=2}, break-graph", registry=_REGISTRY)
    err = info.value
    assert err.pass_name == "break-graph" and err.prior == ("scale-params", "scale-params")
    assert re.search(r"pass 'break-graph' failed \(passes run before it: scale-params, scale-params\): "
                     r"RuntimeError: deliberate failure", str(err))
    assert graph_text(gm) == text
    for key, value in gm.state_dict().items():
        torch.testing.assert_close(value, params[key], atol=0, rtol=0)
    torch.testing.assert_close(gm(x), before, atol=0, rtol=0)


def test_rejects_pass_breaking_an_invariant(captured):
    gm, _ = captured
    with pytest.raises(PassError) as info:
        apply(gm, "scale-params, drop-meta", registry=_REGISTRY)
    assert info.value.prior == ("scale-params",) and "no FakeTensor metadata" in info.value.reason
    assert info.value.node.startswith("%neg") and "offending node: %neg" in str(info.value)


def test_rejects_pass_that_matched_nothing(captured):
    gm, _ = captured
    with pytest.raises(PassError, match=r"match-nothing matched no attention region; near misses: "
                                        r"attention: no softmax at mm_3"):
        apply(gm, "match-nothing", registry=_REGISTRY)


def test_rejects_exact_pass_that_changes_outputs(captured):
    gm, x = captured
    with pytest.raises(PassError, match=r"scale-params.*outputs changed beyond tolerance: FAILED \(exact"):
        apply(gm, "scale-params", verify_inputs=(x,), registry=_REGISTRY)


def test_matches_pipeline_report_and_json(captured):
    gm, _ = captured
    result = apply(gm, [_ScaleParams(), "scale-params{count=2}"], registry=_REGISTRY)
    assert [r.pass_name for r in result.reports] == ["scale-params", "scale-params"]
    doc = json.loads(result.to_json())
    assert [p["pass_name"] for p in doc["passes"]] == ["scale-params", "scale-params"]
    assert str(result.report).count("### scale-params") == 2
    from condfx.lifecycle import apply as with_life_cycle

    assert condfx.apply is with_life_cycle  # the pipeline with the life-cycle table (condfx/lifecycle.py)
