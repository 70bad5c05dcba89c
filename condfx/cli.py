"""The ``condfx`` command line: inspect, optimize, eval, calibrate, export, generate, demo.

Tables and progress bars are for people; ``--json`` prints one JSON object for machines. Every user
error is reported as one sentence on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.text import Text

from condfx import commands

_ERR = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one sentence with exit status 2, like the others."""

    def error(self, message: str):
        msg = f"{message[:1].upper()}{message[1:]} (see '{self.prog} --help')."
        raise commands.UserError(msg)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a zoo name (e.g. llama-tiny), a llama2.c .bin, a .gguf file or a local Hugging Face folder",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="condfx", description="Graph transformations for transformer language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the regions found per layer and the near misses")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=commands.inspect_cmd)

    p = sub.add_parser("optimize", help="apply a pass pipeline and write the result and its report")
    _add_model(p)
    p.add_argument("--passes", required=True, help="pass spec, e.g. 'fuse-attention', or a .json/.yaml file")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
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
    p.add_argument(
        "--passes", default="fuse-attention",
        help="pass spec run before add-kv-cache; it must fuse attention (default fuse-attention)",
    )
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
    p.add_argument("--passes", default=None, help="pass spec before add-kv-cache (default fuse-attention)")
    p.add_argument(
        "--onnx", default=None, metavar="DIR",
        help="run the folder written by 'condfx export' on ONNX Runtime (MODEL gives the tokenizer)",
    )
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.generate_cmd)

    p = sub.add_parser("demo", help="train a tiny recall model, apply the passes, report quality")
    p.add_argument("--retrain", action="store_true", help="ignore the cached demo model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.demo_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``condfx`` console script."""
    from condfx.capture import CaptureError
    from condfx.export_bundle import ExportError
    from condfx.passes.base import PassError

    user_errors = (
        ValueError, TypeError, FileNotFoundError, CaptureError, PassError, ExportError, commands.UserError
    )
    try:
        args = _parser().parse_args(argv)
        func: Callable[[argparse.Namespace], object] = args.func
        result = func(args)
    except user_errors as exc:
        if os.environ.get("CONDFX_DEBUG"):  # read at the entry point only
            raise
        _ERR.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        return 2
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(commands.json_safe(result), indent=2, default=str, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
