"""Hostile options: non-finite, unbounded or ignored values are refused with one sentence.

Pass options are refused when the spec is built (no model needed); options that size new tensors
are checked again against the model's dimensions when the pass runs. Sampling options, ``eval
--context`` and ``--kv-calib`` go through the CLI (exit 2, one line on stderr).
"""

from __future__ import annotations

import re

import pytest

import condfx
from condfx.cli import main
from condfx.options import Float, Int, Optional, check_allocation
from condfx.passes.base import PassError
from condfx.passes.spec import build_passes
from condfx.runtime.sampling import SamplingConfig
from tests._data import require_data
from tests.hostile._stories import stories_graph

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("interleave-heads{init_noise=nan}", r"InterleaveHeadsConfig\.init_noise must be a number in \[0, 10\]; got nan\."),
        ("interleave-heads{init_noise=inf}", r"init_noise must be a number in \[0, 10\]; got inf\."),
        ("interleave-heads{P=1000000000}", r"InterleaveHeadsConfig\.P must be an int in \[1, 64\]; got 1000000000\."),
        ("interleave-heads{P=1e9}", r"option 'P' must be an int; got '1e9'\."),
        ("interleave-heads{seed=-1}", r"InterleaveHeadsConfig\.seed must be an int >= 0; got -1\."),
        ("skip-ffn{policy=forecast,rank=1000000000}", r"SkipFFNConfig\.rank must be an int in \[1, 65536\]"),
        ("skip-ffn{threshold=nan}", r"SkipFFNConfig\.threshold must be a number in \(0, 1\]; got nan\."),
        ("skip-ffn{warmup=99999999999}", r"SkipFFNConfig\.warmup must be an int in \[0, 2147483647\]"),
        ("skip-ffn{state=s.safetensors}", r"state is read by policy=forecast only.*got policy=similarity"),
        ("skip-ffn{rank=8}", r"SkipFFNConfig\.rank is not read by policy=similarity; got rank=8"),
        ("skip-ffn{policy=forecast,span=2}", r"SkipFFNConfig\.span is not read by policy=forecast; got span=2"),
        ("route-attention{temperature=inf}", r"RouteAttentionConfig\.temperature must be a number in \(0, 1000\]; got inf\."),
        ("route-attention{temperature=nan}", r"temperature must be a number in \(0, 1000\]; got nan\."),
        ("prune-global{max_fraction=nan}", r"PruneGlobalConfig\.max_fraction must be a number in \[0, 1\]; got nan\."),
        ("quantize-kv{group=0}", r"QuantizeKVConfig\.group must be an int >= 1; got 0\."),
        ("quantize-kv{k_budget=nan,latent=klt}", r"k_budget must be a number of bits per channel in \[0, 32\]; got nan"),
        ("sink-window{window=0}", r"SinkWindowConfig\.window must be an int >= 1; got 0\."),
    ],
)
def test_rejects_pass_option_at_construction(spec, pattern):
    with pytest.raises(ValueError) as info:
        build_passes(spec)
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"temperature": float("nan")}, r"sampling option temperature must be a number in \[0, 1000\]; got nan\."),
        ({"temperature": float("inf")}, r"temperature must be a number in \[0, 1000\]; got inf\."),
        ({"temperature": -1.0}, r"temperature must be a number >= 0; got -1\.0\."),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]; got nan\."),
        ({"top_k": 2**40}, r"top_k must be an int in \[0, 2147483647\]"),
        ({"greedy": 1}, r"greedy must be a bool"),
    ],
)
def test_rejects_sampling_option(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingConfig.from_options(**options)


def test_bounds_normalise_and_describe():
    assert Float(0.0, 1.0).check("x", 1) == 1.0 and isinstance(Float(0.0, 1.0).check("x", 1), float)
    assert Optional(Int(1, 5)).check("x", None) is None
    with pytest.raises(ValueError, match=r"^x must be None or an int in \[1, 5\]; got 9\.$"):
        Optional(Int(1, 5)).check("x", 9)
    with pytest.raises(ValueError, match=r"^x must be a number in \[0, 1\]; got True\.$"):
        Float(0.0, 1.0).check("x", True)


def test_rejects_allocation_above_the_bound():
    check_allocation("opt=1", 10, limit=100)
    with pytest.raises(ValueError, match=r"^opt=9 would allocate .* GiB of new tensors, more than the .* GiB allowed \(the stated cap\)"):
        check_allocation("opt=9", 2**31, limit=2**30)


def test_rejects_forecast_rank_above_the_model_width():
    with pytest.raises(PassError, match=r"skip-ffn rank=100 exceeds the model width 64"):
        condfx.apply(stories_graph(), "skip-ffn{policy=forecast,rank=100}")


# Through the CLI: exit 2, one line on stderr -----------------------------------------------------


def _one_line_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_rejects_non_finite_temperature(capsys, value):
    model = str(require_data("stories260K.bin"))
    line = _one_line_error(capsys, "generate", model, "--prompt", "hi", f"--temperature={value}")
    assert "temperature must be a number in [0, 1000]" in line


def test_cli_rejects_context_beyond_the_model(capsys):
    model = str(require_data("stories260K.bin"))
    text = str(require_data("tinystories_valid_head.txt"))
    line = _one_line_error(capsys, "eval", model, "--text", text, "--context", "4096")
    assert "--context 4096 is beyond the maximum context" in line and "512 tokens" in line


def test_cli_rejects_kv_calibration_without_klt(capsys, tmp_path):
    model = str(require_data("stories260K.bin"))
    text = str(require_data("tinystories_valid_head.txt"))
    line = _one_line_error(
        capsys, "export", model, "-o", str(tmp_path / "b"), "--passes", "fuse-attention,quantize-kv{bits=4}",
        "--kv-calib", text,
    )
    assert "only read by quantize-kv{latent=klt}" in line


def test_cli_rejects_nan_option_in_optimize(capsys, tmp_path):
    line = _one_line_error(
        capsys, "optimize", "llama-tiny", "--passes", "interleave-heads{init_noise=nan}", "-o", str(tmp_path)
    )
    assert "init_noise must be a number in [0, 10]; got nan." in line
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("deep.json", "[" * 5000, r"deep\.json is nested too deeply to be a pipeline\.$"),
        ("bad.yaml", "a: [1,\n b: {", r"bad\.yaml is not valid YAML \(while parsing"),
        ("bad.json", '{"fuse-attention": ', r"bad\.json is not valid JSON \("),
        ("binary.json", b"\xff\xfe\x00", r"binary\.json is not valid JSON \("),
    ],
)
def test_rejects_malformed_spec_files(tmp_path, name, text, pattern):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as info:
        build_passes(str(path))
    assert "\n" not in str(info.value) and re.search(pattern, str(info.value)), info.value
