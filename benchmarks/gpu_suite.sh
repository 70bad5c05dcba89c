#!/usr/bin/env bash
# The accelerator check, prepared for one `device` call (about 8 minutes on an H100 / H200):
#   1. the Triton kernel tests compiled on the GPU (TRITON_INTERPRET=0): attention, routed attention,
#      the XQuant dequantize-project read, the masked FFN;
#   2. benchmarks/attention_triton.py: condfx attention and routed attention (20% routed) against
#      PyTorch SDPA (its FlashAttention-2 kernel) at 4K..128K tokens, SmolLM2 heads, float16;
#   3. benchmarks/kv_quant_triton.py: the fused 2/3/4-bit dequantize-project read against PyTorch;
#   4. benchmarks/l2a_prefill_model.py on the GPU: whole-model prefill (TTFT) dense vs L2A.
# Each step writes under $OUT (JSON or a log) and has its own time limit, so one slow step cannot
# take the others' results with it. Run from the repository root on the device machine, e.g.
#   bash benchmarks/gpu_suite.sh      (with OUT set by the device tool)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the output, never stop the suite
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    echo "   exit $? ; $(tail -n 1 "$OUT/$name.out" 2>/dev/null | cut -c1-160)"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/device.csv" 2>&1
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "editable install failed: see install.log"
step triton_tests 180 env TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider tests/codegen/triton
step attention 150 $PY benchmarks/attention_triton.py --json --seq-lens 4096 16384 65536 131072
step kv_quant 60 $PY benchmarks/kv_quant_triton.py --json
step l2a_prefill 150 $PY benchmarks/l2a_prefill_model.py --device cuda --lengths 4096,16384,65536 --kv-context 0 --json
echo "results in $OUT"
