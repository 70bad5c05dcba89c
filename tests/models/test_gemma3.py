"""Gemma-3 as users bring it: an HF folder (``save_pretrained``) and a GGUF file (the ``gguf`` package's
writer) load through the CLI commands, and the lossy passes rewrite every layer or say per layer why not.

The cheap commands run in CI; ``export`` (ONNX, ~1 min) and ``calibrate`` are ``slow``.
"""

from __future__ import annotations

import json

import pytest
import torch

import condfx
from condfx.cli import main
from condfx.models_zoo import load
from condfx.passes.base import PassError

pytestmark = pytest.mark.usefixtures("one_thread")

# Passes that must rewrite every Gemma-3 layer (issue 15, "Done when").
LOSSY = {
    "route-attention": "route-attention",
    "kivi": "quantize-kv{method=kivi,group=16}",
    "xquant": "quantize-kv{method=xquant,group=16}",
    "xquant-cl": "quantize-kv{method=xquant-cl,group=16}",
    "skip-ffn": "skip-ffn{cold_start=0,cold_end=0}",
}
# Rewrites that still skip Gemma-3's post-norm layers: none (route-attention and skip-ffn carry the
# post-norm into their new branches).
POST_NORM_GAP: set[str] = set()


def _cli(capsys, *argv: str) -> dict:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text("Once upon a time a small model loaded from a file and told a story. " * 12)
    return path


@pytest.fixture(scope="module")
def gemma3_graph(gemma3_folder):
    model, _ = load(gemma3_folder)
    return model, condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))


@pytest.mark.parametrize("source", ["gemma3_folder", "gemma3_gguf"])
def test_golden_gemma3_inspect_finds_every_layer(capsys, request, source):
    path = request.getfixturevalue(source)
    result = _cli(capsys, "inspect", str(path), "--json")
    n = 3 if source == "gemma3_folder" else 2
    assert result["attention_regions"] == n and result["ffn_regions"] == n
    assert all(layer["attention"]["qk_norm"] for layer in result["layers"].values())


@pytest.mark.parametrize("source", ["gemma3_folder", "gemma3_gguf"])
def test_numerics_gemma3_eval_loads_and_scores(capsys, request, source, text_file):
    path = request.getfixturevalue(source)
    result = _cli(capsys, "eval", str(path), "--text", str(text_file), "--max-tokens", "120", "--json")
    assert result["tokens"] == 119 and 1.0 < result["ppl"] < 1000.0


@pytest.mark.parametrize(
    "source", ["gemma3_folder", "gemma3_gguf"]
)
def test_numerics_gemma3_generate_through_the_session(capsys, request, source):
    path = request.getfixturevalue(source)
    result = _cli(capsys, "generate", str(path), "--prompt", "Once", "--max-new-tokens", "6", "--json")
    assert result["new_tokens"] == 6


def test_golden_gemma3_optimize_writes_a_quantized_program(capsys, gemma3_folder, tmp_path):
    spec = "fuse-attention,quantize-kv{method=kivi,group=16}"
    result = _cli(capsys, "optimize", str(gemma3_folder), "--passes", spec, "-o", str(tmp_path), "--json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["rewritten"] for p in report["passes"]] == [3, 3], result


@pytest.mark.slow
@pytest.mark.parametrize(
    "source", ["gemma3_folder", "gemma3_gguf"]
)
def test_numerics_gemma3_export_within_tolerance(capsys, request, source, tmp_path):
    path = request.getfixturevalue(source)
    result = _cli(capsys, "export", str(path), "-o", str(tmp_path / "bundle"), "--json")
    assert result["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_numerics_gemma3_calibrate(capsys, gemma3_folder, text_file):
    argv = ["calibrate", str(gemma3_folder), "--text", str(text_file), "--target-skip", "0.2"]
    _cli(capsys, *argv, "--max-tokens", "200", "--json")


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_matches_gemma3_lossy_passes_say_per_layer_why(gemma3_graph, name):
    """Every layer is rewritten or skipped with a reason naming it (or, once a pass that rewrote
    nothing is an error, the error lists the reasons)."""
    _, gm = gemma3_graph
    try:
        report = condfx.apply(gm, LOSSY[name]).reports[0]
    except PassError as err:  # a pass that rewrote nothing is an error listing the reasons
        assert name in POST_NORM_GAP and "rewrote none: post-norm" in str(err), err
        return
    details = sorted(detail for _, detail in report.skipped)
    assert report.rewritten + len(details) == 3
    assert all(reason for reason, _ in report.skipped)
    assert len(set(details)) == len(details) and all(d.startswith("layer ") for d in details)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason="post-norm layers are skipped", strict=True))
     if n in POST_NORM_GAP else n for n in sorted(LOSSY)],
)
def test_numerics_gemma3_lossy_passes_rewrite_every_layer(gemma3_graph, name):
    model, gm = gemma3_graph
    result = condfx.apply(gm, LOSSY[name])
    assert result.reports[0].rewritten == 3
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(result.graph_module(ids)[0] if name == "route-attention" else
                              result.graph_module(ids)).all()
