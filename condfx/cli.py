"""The ``condfx`` command line: inspect, optimize, eval, calibrate, export, generate, demo.

Tables and progress bars are for people; ``--json`` prints one JSON object for machines. Every user
error is reported as one sentence on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

from rich.console import Console
from rich.text import Text

from condfx import commands, commands_passes, errors, recipes

_ERR = Console(stderr=True)
# torch.onnx's exporter logs one warning per torchvision op it cannot register when torchvision is
# absent ("torchvision is not installed. Skipping torchvision::nms", eight of them per export); none
# concerns a language model, so the command line keeps that logger to errors.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
# Deep-copying a captured graph module pickles its pytree specs, and torch 2.13 warns on each copy
# ("isinstance(treespec, LeafSpec) is deprecated"): torch's own code, nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)`? is deprecated", category=FutureWarning)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one sentence with exit status 2, like the others."""

    def error(self, message: str):
        msg = f"{message[:1].upper()}{message[1:]} (see '{self.prog} --help')."
        raise commands.UserError(msg)


def _seed(text: str) -> int:
    """argparse type of --seed: an int a torch.Generator takes, 0 <= seed < 2**63."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        msg = f"must be an integer from 0 to 2**63 - 1; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a zoo name (e.g. llama-tiny), a llama2.c .bin, a .gguf file or a local Hugging Face folder",
    )


def _add_recipe(p) -> None:
    p.add_argument(
        "--recipe", default=None, metavar="NAME",
        help=f"a named pipeline instead of --passes: {', '.join(recipes.names())}, or a recipe .yaml file",
    )


def _resolve_passes(args: argparse.Namespace) -> None:
    """``--recipe NAME`` becomes the recipe's spec in ``args.passes`` (export's default stays its own)."""
    if hasattr(args, "recipe"):
        args.passes = recipes.passes_of(args)
        if args.passes is None and args.command == "export":
            args.passes = "fuse-attention"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="condfx", description="Graph transformations for transformer language models.",
        epilog=(
            "Errors are one line on stderr: exit status 2 for bad input (the line names the file or "
            "option and what is allowed), 1 for an internal error. Set CONDFX_DEBUG=1 for the "
            "Python traceback instead. 'condfx passes' lists every pass with its options, bounds and "
            "defaults ('condfx passes NAME' shows one); --recipe NAME (optimize, generate, export) runs "
            f"a named pipeline: {', '.join(recipes.names())}."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the regions found per layer and the near misses")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=commands.inspect_cmd)

    p = sub.add_parser("optimize", help="apply a pass pipeline and write the result and its report")
    _add_model(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--passes", help="pass spec, e.g. 'fuse-attention', or a .json/.yaml file")
    _add_recipe(which)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--allow-partial", action="store_true",
        help="accept a pass that matched regions but rewrote none (by default that is an error)",
    )
    p.add_argument("--calib", default=None,
                   help="calibration text: passes that need statistics or training get them from it")
    p.add_argument("--eval", default=None,
                   help="evaluation text: measure perplexity, greedy agreement, skip/route fractions, KV "
                        "bytes, speed and memory of the original and after each pass")
    p.add_argument("--eval-tokens", type=int, default=2048, help="evaluation tokens scored (default 2048)")
    p.add_argument("--eval-context", type=int, default=None,
                   help="perplexity window in tokens (default min(512, model context))")
    p.add_argument("--kv-context", type=int, default=None,
                   help="tokens prefilled before the result's KV cache bytes are read (default min(2048, model context))")
    p.add_argument("--kv-context-each", type=int, default=2048,
                   help="tokens prefilled for the KV bytes of the original and each partial stack (default "
                        "2048, at most --kv-context): a dense cache's bytes per token do not depend on it")
    p.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens compared (default 32)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens read (default 4096)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration batch (default 256)")
    p.add_argument("--calib-start", default=None, metavar="N|P%",
                   help="where calibration starts in --calib: a token offset N (BOS is token 0, no BOS added; e.g. "
                        "the --eval-tokens of the same file) or P%% (after the first blank line at or after P%% "
                        "of the file's characters, with a BOS); default its beginning")
    p.add_argument("--steps", type=int, default=100, help="training steps of passes that train (default 100)")
    p.add_argument("--train-seconds", type=float, default=None, help="time budget of each training stage")
    p.add_argument("--skip-target", type=float, default=0.2,
                   help="fraction of FFN blocks a calibrated skip-ffn aims to skip (default 0.2)")
    p.add_argument("--route-target", type=float, default=0.1,
                   help="fraction of queries a trained route-attention aims to route globally (default 0.1)")
    p.add_argument("--export", choices=["onnx"], default=None,
                   help="also write the ONNX bundle (prefill + decode) to OUTPUT/onnx, checked against PyTorch")
    p.set_defaults(func=commands.optimize_cmd)

    p = sub.add_parser("eval", help="perplexity of a model on a text file")
    _add_model(p)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument(
        "--max-tokens", type=int, default=None,
        help="score the first N tokens of the text as one stream (default: score documents)",
    )
    p.add_argument(
        "--max-docs", type=int, default=200,
        help="without --max-tokens: score the first N blank-line-separated documents (default 200)",
    )
    p.add_argument("--context", type=int, default=None, help="window length (default: model context)")
    p.add_argument("--passes", default=None, help="apply this pass spec before evaluating")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--allow-partial", action="store_true",
        help="accept a pass that matched regions but rewrote none (by default that is an error)",
    )
    p.set_defaults(func=commands.eval_cmd)

    p = sub.add_parser(
        "calibrate", help="calibrate skip-ffn for a target skip fraction and print the similarity profile",
        description=(
            "Writes a calibration file; use it with e.g. --passes \"fuse-attention, $(python -c "
            "\"from condfx.calibrate import SkipCalibration as C; print(C.load('calib.json').spec())\")\"."
        ),
    )
    _add_model(p)
    p.add_argument("--text", required=True, help="a UTF-8 text file whose tokens calibrate")
    p.add_argument("--target-skip", type=float, required=True, help="fraction of FFN blocks to skip, in (0, 1)")
    p.add_argument("-o", "--output", default=None, help="calibration file (default <model stem>.skip-calibration.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot the similarity profile to this PNG")
    p.add_argument("--max-tokens", type=int, default=1024, help="calibrate on the first N tokens (default 1024)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.calibrate_cmd)

    p = sub.add_parser("export", help="write prefill and decode ONNX graphs with condfx custom ops")
    _add_model(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--passes", default=None,
        help="pass spec run before add-kv-cache; it must fuse attention (default fuse-attention)",
    )
    _add_recipe(which)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--kv-calib", default=None, metavar="TEXT",
                   help="calibration text for quantize-kv{latent=klt} (its first 4,096 tokens)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.export_cmd)

    p = sub.add_parser("generate", help="generate from a prompt (greedy unless sampling options are given)")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=60)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--passes", default=None, help="pass spec before add-kv-cache (default fuse-attention)")
    _add_recipe(which)
    p.add_argument(
        "--onnx", default=None, metavar="DIR",
        help="run the folder written by 'condfx export' on ONNX Runtime (MODEL gives the tokenizer)",
    )
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=_seed, default=None, help="seed of the sampler (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.generate_cmd)

    p = sub.add_parser(
        "passes", help="list the passes with their options, bounds and defaults (or show one: NAME)")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="show this pass only")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands_passes.passes_cmd)

    p = sub.add_parser("demo", help="the stack on stories260K: quality, speed and memory before and after")
    p.add_argument("--retrain", action="store_true", help="ignore the cached learned state of the demo")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.demo_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``condfx`` console script.

    Every exception ends as one line on stderr (``condfx.errors.explain``): exit 2 for bad input,
    1 for an internal error, 130 for Ctrl-C. With ``CONDFX_DEBUG=1`` the traceback is raised instead.
    """
    debug = bool(os.environ.get(errors.DEBUG_VARIABLE))  # read at the entry point only
    try:
        args = _parser().parse_args(argv)
        _resolve_passes(args)
        func: Callable[[argparse.Namespace], object] = args.func
        result = func(args)
    except Exception as exc:  # noqa: BLE001 (the CLI's one place that turns every error into a line)
        return _report(exc, debug)
    except KeyboardInterrupt as exc:
        return _report(exc, debug)
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(commands.json_safe(result), indent=2, default=str, allow_nan=False))
    return 0


def _report(exc: BaseException, debug: bool) -> int:
    if debug:
        raise exc
    line, status = errors.explain(exc)
    label = ("internal error: ", "bold red") if status == 1 else ("error: ", "bold red")
    _ERR.print(Text.assemble(label, line), soft_wrap=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
