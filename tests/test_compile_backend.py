"""torch.compile(model, backend="condfx", options={"passes": ...}): rewrites, reports, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import condfx.compile_backend as cb
from condfx.models_zoo import build_zoo
from condfx.models_zoo.hf import build_hf

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _compiled(model, **options):
    report = cb.CompileReport()
    options = {"passes": "fuse-attention", "inductor": False, "report": report, **options}
    return torch.compile(model, backend="condfx", options=options), report


@pytest.mark.parametrize("kind", ["zoo", "hf"])
def test_numerics_llama_matches_eager(kind):
    model = build_zoo("llama-tiny") if kind == "zoo" else build_hf("llama")
    n_layers = 2
    compiled, report = _compiled(model)
    with torch.no_grad():
        got, want = _logits(compiled(TOKENS)), _logits(model(TOKENS))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert report.rewritten("fuse-attention") == n_layers
    assert report.unmatched_passes == ()
    assert cb.report_of(compiled) is report


class _PrintBetweenBlocks(nn.Module):
    """The zoo Llama's forward with a print (a graph break) between its blocks."""

    def __init__(self):
        super().__init__()
        self.model = build_zoo("llama-tiny")

    def forward(self, input_ids):
        m = self.model
        h = m.tok_embeddings(input_ids)  # (B, T, C)
        cos, sin = m.rope_cos_sin(input_ids.shape[1], h.device)  # (T, D)
        h = m.layers[0](h, cos, sin, None)  # (B, T, C)
        print("condfx test: graph break")  # noqa: T201  (outside a loop, so Dynamo resumes after it)
        h = m.layers[1](h, cos, sin, None)  # (B, T, C)
        return m.output(m.norm(h))  # (B, T, V)


def test_numerics_graph_break_keeps_every_rewrite(capsys):
    model = _PrintBetweenBlocks().eval()
    compiled, report = _compiled(model)
    with torch.no_grad():
        got, want = compiled(TOKENS), model(TOKENS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert len(report.graphs) == 2
    assert [g.graph_break for g in report.graphs] == [True, False]
    assert [g.rewritten() for g in report.graphs] == [1, 1]
    assert report.rewritten("fuse-attention") == len(model.model.layers)


def test_numerics_inductor_and_training_gradients():
    model = build_zoo("llama-tiny")
    compiled, report = _compiled(model, inductor=True)
    got = compiled(TOKENS)
    torch.testing.assert_close(got, model(TOKENS), atol=1e-4, rtol=0)
    assert report.rewritten("fuse-attention") == 2
    got.float().pow(2).mean().backward()  # autograd runs through condfx.attention
    assert model.layers[0].attention.wq.weight.grad is not None


def test_rejects_bad_spec_with_value_error():
    with pytest.raises(ValueError, match="Malformed pass spec"):
        cb.compile_model(build_zoo("llama-tiny"), "fuse-attention{layers=")
    with pytest.raises(ValueError, match="no-such-pass"):
        cb.BackendOptions.parse({"passes": "no-such-pass"})
    with pytest.raises(ValueError, match="allowed options"):
        cb.BackendOptions.parse({"passes": "fuse-attention", "inductr": False})
    compiled = torch.compile(nn.Linear(4, 4), backend="condfx", options={"passes": "fuse-attention{"})
    with pytest.raises(Exception, match="Malformed pass spec") as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value.__cause__ or info.value.inner_exception, ValueError)


def test_rejects_model_without_attention_with_warning():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    compiled, report = _compiled(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="'fuse-attention' rewrote nothing"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    assert report.unmatched_passes == ("fuse-attention",)
    assert "Unmatched passes: fuse-attention" in str(report)


def test_matches_entry_point_registration():
    assert "condfx" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("condfx") is cb.condfx_backend
    options = {"passes": "fuse-attention", "inductor": False}
    compiled = torch.compile(build_zoo("llama-tiny"), backend="condfx", options=options)
    compiled(TOKENS)
    report = cb.report_of(compiled)  # stored under options["report"] by the backend
    assert report is options["report"] and report.rewritten() == 2
    assert report.to_dict()["graphs"][0]["passes"][0]["rewritten"] == 2
