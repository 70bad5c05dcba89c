"""SmolLM2 in every engine a CPU user would run: llama.cpp, ONNX Runtime GenAI, Hugging Face
``generate``, the condfx torch Session and the condfx ONNX Runtime Session, at the same weight
precision (float32: the GGUF's weights dequantized once, the same values in every engine).

Workloads (greedy decoding, token ids from the Paul Graham essays):

* ``batch B, prompt P, N new``: prefill tokens/s = B·P / time(prompt + 1 token); decode tokens/s =
  B·(N - 1) / (time(prompt + N tokens) - time(prompt + 1 token)), best of ``--repeats``;
* ``context C``: one prompt of C tokens, then ``--context-new`` tokens (decode speed at a long cache).

condfx's bundle is exported at ``--opset`` (default 23: RMSNorm, RoPE and attention with its cache as
single standard nodes, ``condfx.codegen.onnx_peephole``; 18 is ``condfx export``'s default).

Every engine runs in its own child process, one after another for each thread count, so its peak
resident memory (VmHWM of the child: weights, caches and runtime, at the largest workload) is
its own. CPU figures are ratios against Hugging Face ``generate`` measured in the same run; the
machine may be shared, so read absolute tokens/s with care.

An engine that is not installed (the ``[peers]`` extra: ``llama-cpp-python``, ``onnxruntime-genai``)
or cannot run a workload gets the reason in its cell instead of a figure; llama-cpp-python's
high-level API decodes one sequence, so its batch-8 cells say so.

    python benchmarks/peers.py [--gguf PATH] [--threads 1,all] [--batches 1,8] [--prompt 512]
        [--new 128] [--contexts 4096,8192] [--engines ...] [--opset 23] [--work DIR] [--json] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("hf", "condfx-torch", "condfx-onnx", "llama.cpp", "ort-genai")
_LABELS = {
    "hf": "HF generate",
    "condfx-torch": "condfx torch Session",
    "condfx-onnx": "condfx ONNX Runtime Session",
    "llama.cpp": "llama.cpp (llama-cpp-python)",
    "ort-genai": "ONNX Runtime GenAI",
}


class Unavailable(Exception):
    """An engine or workload this run cannot measure; the message is the table cell's reason."""


# ---------------------------------------------------------------- prompts and timing


def _prompts(tok, batch: int, length: int) -> list[list[int]]:
    """``batch`` prompts of ``length`` tokens from different places in the essays."""
    from condfx.data import data_file

    text = data_file("paul_graham_essays.txt").read_text(encoding="utf-8")
    ids = tok.encode(text[: 6 * length * (batch + 1) + 10_000], bos=False)
    if len(ids) < length * batch:
        msg = f"the essays gave {len(ids)} tokens, fewer than {batch} x {length}"
        raise Unavailable(msg)
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(run, prompts: list[list[int]], new: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of ``run(prompts, n)`` (greedy, n new tokens per prompt)."""
    run(prompts, 2)  # warm-up
    first = _best_time(lambda: run(prompts, 1), repeats)
    full = _best_time(lambda: run(prompts, new), repeats)
    tokens = len(prompts) * len(prompts[0])
    decode = max(full - first, 1e-9)
    return {"prefill_tok_s": round(tokens / first, 1), "decode_tok_s": round(len(prompts) * (new - 1) / decode, 2)}


# ---------------------------------------------------------------- engines (built in the child)


def _load(args):
    import torch

    from condfx.models_zoo import load

    torch.set_num_threads(args.threads[0])
    return load(args.gguf)[0]


def _hf(args):
    import torch

    hf = _load(args).hf

    def run(prompts, n):
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                        max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    return run


def _session_run(session):
    from condfx.runtime import generate

    def run(prompts, n):
        generate(session, prompts, max_new_tokens=n, greedy=True)

    return run


def _condfx_torch(args):
    from condfx.runtime import Session

    return _session_run(Session.from_model(_load(args), passes="fuse-attention"))


def _condfx_onnx(args):
    from condfx.runtime import Session

    return _session_run(Session.from_onnx(_artifact(args, "condfx-onnx"), threads=args.threads[0]))


def _llama_cpp(args):
    try:
        import llama_cpp
    except ImportError as err:
        msg = "llama-cpp-python is not installed (pip install '.[peers]')"
        raise Unavailable(msg) from err
    import numpy as np

    n_ctx = max([args.prompt + args.new, *(c + args.context_new for c in args.contexts)]) + 8
    threads = args.threads[0]
    llm = llama_cpp.Llama(model_path=str(_artifact(args, "llama.cpp")), n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    vocab = llm.n_vocab()

    def run(prompts, n):
        if len(prompts) > 1:
            msg = "llama-cpp-python's Llama decodes one sequence"
            raise Unavailable(msg)
        llm.reset()
        llm.eval(prompts[0])
        for _ in range(n - 1):  # greedy on the last row's logits (scores are kept only with logits_all)
            last = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
            llm.eval([int(np.argmax(last))])

    return run


def _ort_genai(args):
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        msg = "onnxruntime-genai is not installed (pip install '.[peers]')"
        raise Unavailable(msg) from err
    config = og.Config(str(_artifact(args, "ort-genai")))
    config.clear_providers()  # the CPU provider
    model = og.Model(config)

    def run(prompts, n):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompts[0]) + n, batch_size=len(prompts))
        gen = og.Generator(model, params)
        gen.append_tokens(prompts)
        for _ in range(n - 1):
            gen.generate_next_token()

    return run


_BUILDERS = {"hf": _hf, "condfx-torch": _condfx_torch, "condfx-onnx": _condfx_onnx, "llama.cpp": _llama_cpp,
             "ort-genai": _ort_genai}


# ---------------------------------------------------------------- artifacts (prepared by the parent)


def f32_gguf(src: Path, dst: Path) -> Path:
    """A copy of GGUF ``src`` with every tensor dequantized to float32 (metadata kept as it is)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape.tolist())]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _hf_folder(model, folder: Path, gguf: Path) -> Path:
    """The float32 weights, config and tokenizer as a Hugging Face folder (a GGUF-loaded model refuses
    ``save_pretrained``: its config still names the GGUF quantization)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = model.hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model.hf).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def _build_genai(model, args, out: Path) -> None:
    hf_dir = _hf_folder(model, args.work / "hf", args.gguf)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(args.work / "genai-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        msg = f"its model builder failed: {last[:160]}"
        raise Unavailable(msg)


def _prepare_one(engine: str, model, args) -> None:
    import condfx

    out = _artifact_path(args, engine)
    if out is None or out.exists():
        return
    if engine == "condfx-onnx":
        condfx.export_model(model, out, passes="fuse-attention", opset=args.opset)
    elif engine == "llama.cpp":
        f32_gguf(args.gguf, out)
    elif engine == "ort-genai":
        _build_genai(model, args, out)


def _artifact_path(args, engine: str) -> Path | None:
    names = {"condfx-onnx": f"condfx-onnx-opset{args.opset}", "llama.cpp": "smollm2-f32.gguf", "ort-genai": "ort-genai"}
    return args.work / names[engine] if engine in names else None


def _artifact(args, engine: str) -> Path:
    path = _artifact_path(args, engine)
    if not path.exists():
        reasons = json.loads((args.work / "prepare.json").read_text()) if (args.work / "prepare.json").is_file() else {}
        raise Unavailable(reasons.get(engine, f"{path} was not prepared"))
    return path


def prepare(args) -> None:
    """Prompts for every workload and each engine's converted model, written under ``--work``."""
    from condfx.models_zoo import load

    model, tok = load(args.gguf)
    prompts = {label: _prompts(tok, b, length) for label, b, length, _ in _workloads(args)}
    (args.work / "prompts.json").write_text(json.dumps(prompts))
    reasons = {}
    for engine in args.engines:
        print(f"preparing {_LABELS[engine]} ...", file=sys.stderr, flush=True)
        try:
            _prepare_one(engine, model, args)
        except Unavailable as why:
            reasons[engine] = str(why)
    (args.work / "prepare.json").write_text(json.dumps(reasons))


# ---------------------------------------------------------------- one engine, in a child process


def _workloads(args) -> list[tuple[str, int, int, int]]:
    """(label, batch, prompt length, new tokens) of every workload, the largest last."""
    rows = [(f"batch {b}, prompt {args.prompt}, {args.new} new", b, args.prompt, args.new) for b in args.batches]
    rows += [(f"context {c}, {args.context_new} new", 1, c, args.context_new) for c in args.contexts]
    return rows


def child(args) -> dict:
    """Measures one engine at one thread count; returns its cells and peak memory."""
    prompts = json.loads((args.work / "prompts.json").read_text())
    try:
        run = _BUILDERS[args.engine](args)
    except Unavailable as why:
        return {"cells": {w[0]: str(why) for w in _workloads(args)}, "peak_rss_mb": None}
    cells: dict[str, dict | str] = {}
    for label, _, _, new in _workloads(args):
        try:
            cells[label] = _measure(run, prompts[label], new, args.repeats)
        except Unavailable as why:
            cells[label] = str(why)
        print(f"  {_LABELS[args.engine]}: {label}: {cells[label]}", file=sys.stderr, flush=True)
    return {"cells": cells, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM: unlike ``ru_maxrss`` it does not carry
    over the parent's peak through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _spawn(args, engine: str, threads: int) -> dict:
    argv = [sys.executable, __file__, "--child", engine, "--threads", str(threads), "--gguf", str(args.gguf),
            "--work", str(args.work), "--prompt", str(args.prompt), "--new", str(args.new),
            "--batches", ",".join(map(str, args.batches)), "--contexts", ",".join(map(str, args.contexts)),
            "--context-new", str(args.context_new), "--repeats", str(args.repeats), "--opset", str(args.opset)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        return {"cells": {w[0]: f"the engine's process failed (exit {done.returncode})" for w in _workloads(args)},
                "peak_rss_mb": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the parent: table, JSON, plot


def run_all(args) -> dict:
    prepare(args)
    results = {}
    for threads in args.threads:
        for engine in args.engines:
            print(f"{_LABELS[engine]}, {threads} thread(s) ...", file=sys.stderr, flush=True)
            results[f"{engine}@{threads}"] = _spawn(args, engine, threads)
    for threads in args.threads:  # ratios against HF generate in the same run
        ref = results.get(f"hf@{threads}", {}).get("cells", {})
        for engine in args.engines:
            for label, cell in results[f"{engine}@{threads}"]["cells"].items():
                base = ref.get(label)
                if isinstance(cell, dict) and isinstance(base, dict):
                    cell["decode_vs_hf"] = round(cell["decode_tok_s"] / base["decode_tok_s"], 3)
                    cell["prefill_vs_hf"] = round(cell["prefill_tok_s"] / base["prefill_tok_s"], 3)
    return {"model": str(args.gguf), "precision": "float32", "threads": args.threads,
            "workloads": [w[0] for w in _workloads(args)], "engines": results}


def markdown(result: dict) -> str:
    lines = ["| engine | threads | workload | prefill tok/s | decode tok/s | decode vs HF | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for key, res in result["engines"].items():
        engine, threads = key.split("@")
        for label, cell in res["cells"].items():
            if isinstance(cell, dict):
                vs = f"{cell['decode_vs_hf']:.2f}x" if "decode_vs_hf" in cell else ""
                lines.append(f"| {_LABELS[engine]} | {threads} | {label} | {cell['prefill_tok_s']:.0f} | "
                             f"{cell['decode_tok_s']:.1f} | {vs} | {res['peak_rss_mb']} |")
            else:
                lines.append(f"| {_LABELS[engine]} | {threads} | {label} | n/a | n/a ({cell}) | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = result["workloads"]
    keys = list(result["engines"])
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        cells = result["engines"][key]["cells"]
        ys = [c["decode_tok_s"] if isinstance(c, dict) else 0 for c in (cells[w] for w in labels)]
        engine, threads = key.split("@")
        ax.bar([j + i * width for j in range(len(labels))], ys, width, label=f"{_LABELS[engine]} ({threads}t)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("decode tokens/s (float32)")
    ax.set_title("SmolLM2-135M on CPU, same run")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _threads(text: str) -> list[int]:
    return [(os.cpu_count() or 1) if x == "all" else int(x) for x in text.split(",") if x]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the data folder's SmolLM2 GGUF")
    ap.add_argument("--threads", type=_threads, default=[1, os.cpu_count() or 1], help="e.g. 1,all")
    ap.add_argument("--batches", type=_ints, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--contexts", type=_ints, default=[4096, 8192])
    ap.add_argument("--context-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--opset", type=int, default=23,
                    help="ONNX opset of the condfx export (23: attention and RMSNorm as single standard ops)")
    ap.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "condfx" / "peers",
                    help="converted GGUF, ONNX bundles and the HF folder for ORT GenAI (reused)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--child", choices=ENGINES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    if args.gguf is None:
        from condfx.data import data_file

        args.gguf = data_file("SmolLM2-135M-Instruct.Q4_1.gguf")
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.child:
        args.engine = args.child
        print(json.dumps(child(args)))
        return None
    result = run_all(args)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return result


if __name__ == "__main__":
    main()
