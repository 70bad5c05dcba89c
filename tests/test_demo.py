"""Tests for condfx.demo: stories260K, the stack calibrated on a tiny budget, measured before and after,
the learned state cached and reloaded."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from condfx import demo
from tests._data import require_data

_TINY = demo.DemoBudget(steps=2, calib_tokens=256, seq_len=128, eval_tokens=300, decode_tokens=4)


@pytest.mark.slow  # about a minute (the whole `condfx demo` took 66 s cold beside a CI run)
def test_run_demo_applies_the_stack_caches_its_state_and_measures(tmp_path, monkeypatch):
    require_data("stories260K.bin")
    monkeypatch.setenv("CONDFX_CACHE", str(tmp_path))
    out = io.StringIO()
    first = demo.run_demo(console=Console(file=out, width=160), budget=_TINY)
    assert first["how"] == "calibrated" and demo.cache_path(_TINY).is_file()
    before, after = first["before"], first["after"]
    assert before["kv_bytes_per_token"] > 0 and after["kv_bytes_per_token"] < before["kv_bytes_per_token"] / 2
    assert after["skip_fraction"] is not None and before["skip_fraction"] is None
    assert after["ppl"] != before["ppl"] and before["decode_tps"] > 0 and after["decode_tps"] > 0
    assert "skip-ffn{threshold=" in first["passes"]  # calibrated, not the default
    text = out.getvalue()
    assert "before and after" in text and "KV bytes/token" in text
    json.dumps(first)  # what `condfx demo --json` prints

    import condfx
    from condfx.models_zoo import load

    model, tok = load(require_data("stories260K.bin"))
    gm = condfx.capture(model, (torch.zeros(2, 8, dtype=torch.long),))
    again, how = demo._stack(gm, tok, _TINY, False, print)  # the cached state, no calibration text read
    assert how == "cached" and again.spec == first["passes"]


def test_cache_path_follows_the_passes_and_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDFX_CACHE", str(tmp_path))
    assert demo.cache_path().parent == tmp_path
    assert demo.cache_path(_TINY) != demo.cache_path() and demo.cache_path(_TINY).name.startswith("demo_stack_")
