"""Tests for codegen/triton/kv_quant.py: the fused dequantize-and-project read kernel.

The kernel runs in the Triton interpreter in a child process started with ``TRITON_INTERPRET=1``,
so this process's Triton (and the other kernel tests' setup) is left untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from condfx.codegen.triton.kv_quant import dequant_project_fwd

ROOT = Path(__file__).resolve().parents[3]

_SCRIPT = """
import json, torch
from condfx.codegen.triton.kv_quant import dequant_project_fwd, dequant_project_reference
from condfx.ops.kv_quant import quantize_reference
torch.manual_seed(0)
out = []
for bits in (2, 3, 4):
    for n, c, m, g in ((5, 32, 24, 8), (19, 64, 40, 32), (3, 48, 16, 16)):
        x, w = torch.randn(n, c), torch.randn(c, m)
        codes, s, z = quantize_reference(x, bits, g, -1)
        y = dequant_project_fwd(codes, s, z, w, bits, g)
        ref = dequant_project_reference(codes, s, z, w, bits, g)
        exact = x @ w
        out.append([bits, n, c, m, g, (y - ref).abs().max().item(), (ref - exact).abs().max().item()])
print(json.dumps(out))
"""


def test_numerics_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 9
    for bits, n, c, m, g, err, quant_err in rows:
        assert err < 1e-4, (bits, n, c, m, g, err)
        assert quant_err > 100 * err  # the check can fail: quantization error dwarfs kernel error


def test_rejects_unsupported_bits_and_shapes():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    scale = torch.zeros(4, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="need bits in"):
        dequant_project_fwd(codes, scale, scale, torch.zeros(32, 4), 5, 16)
    with pytest.raises(ValueError, match="scale and zero must be"):
        dequant_project_fwd(codes, scale[:, :1], scale[:, :1], torch.zeros(32, 4), 2, 16)
