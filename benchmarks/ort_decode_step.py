"""One decode step of condfx ONNX exports against llama.cpp, the engines taking turns in one process.

A shared machine moves under sequential runs (``peers.py`` runs one engine after another); here every
round times ``--steps`` decode steps of each engine in turn, so load changes hit all of them alike.
The ONNX side is the bare ``decode.onnx`` session (the condfx Session around it adds nothing
measurable), fed random caches of ``--context`` positions; llama.cpp evaluates one token after a
``--context``-token prompt, rewinding its cache each time. Prints min and median ms per step and
llama.cpp's time over each export's (>= 1: the export is at least as fast).

    PYTHONPATH=$PWD:<llama_cpp> LLAMA_CPP_LIB_PATH=<libs> python benchmarks/ort_decode_step.py
        --gguf WORK/smollm2-f32.gguf WORK/condfx-onnx-opset18 WORK/condfx-onnx-opset23 [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def _onnx_step(folder: Path, threads: int, context: int):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([[42]], dtype=np.int64)
        else:  # (B, Hkv, P, D): heads and head size are static in a condfx export
            feeds[i.name] = rng.standard_normal((1, i.shape[1], context, i.shape[3])).astype(np.float32)
    outputs = [o.name for o in session.get_outputs()]
    return lambda: session.run(outputs, feeds)


def _llama_step(gguf: Path, threads: int, context: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context + 16, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    llm.eval(list(range(100, 100 + context)))

    def step():
        llm.n_tokens = context  # the next eval drops what came after the prompt
        llm.eval([42])

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", type=Path, nargs="+", help="folders written by condfx export")
    ap.add_argument("--gguf", type=Path, default=None, help="the llama.cpp model (peers.py writes an F32 one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    engines = {str(f): _onnx_step(f, args.threads, args.context) for f in args.exports}
    if args.gguf is not None:
        engines = {"llama.cpp": _llama_step(args.gguf, args.threads, args.context), **engines}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for step in engines.values():  # warm-up
        step()
    for _ in range(args.rounds):
        for name, step in engines.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    result = {name: {"min_ms": round(min(t), 2), "median_ms": round(statistics.median(t), 2)} for name, t in times.items()}
    base = result.get("llama.cpp")
    for name, row in result.items():
        vs = f"; llama.cpp / this: {base['min_ms'] / row['min_ms']:.2f}x min, " \
             f"{base['median_ms'] / row['median_ms']:.2f}x median" if base else ""
        print(f"{name}: {row['min_ms']:.2f} ms min, {row['median_ms']:.2f} ms median per step{vs}")
    return result


if __name__ == "__main__":
    main()
