"""Tests for condfx.demo: train (tiny budget) -> capture -> fuse-attention -> verify -> report."""

from __future__ import annotations

import io
import json

from rich.console import Console

from condfx import demo
from condfx.eval import tasks


def test_run_demo_trains_caches_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDFX_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks, "DEMO_STEPS", 250)  # ~99 % at this budget; the default adds margin
    out = io.StringIO()
    first = demo.run_demo(console=Console(file=out, width=120))
    assert first["model"].endswith("(trained)")
    assert demo.cache_path().is_file()
    assert first["accuracy_before"] >= 0.9
    assert first["accuracy_after"] == first["accuracy_before"]
    assert first["max_abs_logit_diff"] <= 1e-5
    assert first["verified"] is True
    assert first["report"]["passes"][0]["rewritten"] == 2  # both attention layers fused
    text = out.getvalue()
    assert "fuse-attention" in text and "MQAR accuracy" in text
    json.dumps(first)  # what `condfx demo --json` prints

    second = demo.run_demo(quiet=True)
    assert second["model"].endswith("(cached)")
    assert second["accuracy_before"] == first["accuracy_before"]
    assert second["report"]["passes"][0]["rewritten"] == 2
