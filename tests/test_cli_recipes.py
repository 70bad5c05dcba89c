"""``--recipe`` (named pipelines shipped as YAML in condfx/recipes) and ``condfx passes`` (the
registry, the config dataclasses and their bounds, printed)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from condfx import recipes
from condfx.cli import main
from condfx.passes.registry import PASSES
from condfx.passes.spec import parse_spec


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_recipes_parse_into_registered_passes():
    assert set(recipes.names()) >= {"kv-small", "long-context", "decode-fast", "stack"}
    for name in recipes.names():
        recipe = recipes.load(name)
        assert recipe.description
        assert all(p.name in PASSES for p in parse_spec(recipe.spec))
    assert [p.name for p in parse_spec(recipes.spec_text("stack"))] == [
        "route-attention", "prune-global", "quantize-kv", "skip-ffn"]


def test_optimize_with_recipe_runs_its_passes(capsys, tmp_path):
    path = tmp_path / "tiny.yaml"  # llama-tiny has 2 FFN layers and K/V 16 wide: the shipped ones need more
    path.write_text("description: tiny\npasses:\n  - fuse-attention\n  - quantize-kv: {method: kivi, group: 4}\n")
    code, _, err = _run(capsys, "optimize", "llama-tiny", "--recipe", str(path), "-o", str(tmp_path / "o"), "--json")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [p["pass_name"] for p in report["passes"]] == ["fuse-attention", "quantize-kv"]


def test_recipe_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("description: mine\npasses:\n  - fuse-attention\n  - quantize-kv: {method: kivi, bits: 2}\n")
    assert recipes.spec_text(str(path)) == "fuse-attention, quantize-kv{method=kivi,bits=2}"


def test_bad_input_unknown_recipe_lists_the_recipes(capsys, tmp_path):
    code, _, err = _run(capsys, "optimize", "llama-tiny", "--recipe", "fastest", "-o", str(tmp_path))
    assert code == 2
    line = " ".join(err.split())
    assert "Unknown recipe 'fastest'; the recipes are decode-fast, kv-small, long-context, stack" in line
    assert "Traceback" not in err


def test_bad_input_recipe_and_passes_together(capsys, tmp_path):
    code, _, err = _run(capsys, "optimize", "llama-tiny", "--recipe", "stack", "--passes", "fuse-attention",
                        "-o", str(tmp_path))
    assert code == 2 and "not allowed with argument" in err


def test_passes_lists_every_registered_pass_with_options_from_the_configs(capsys):
    code, out, _ = _run(capsys, "passes", "--json")
    assert code == 0
    entries = {e["name"]: e for e in json.loads(out)["passes"]}
    assert set(entries) == set(PASSES)
    for name, cls in PASSES.items():
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        assert [o["name"] for o in entries[name]["options"]] == fields
        assert entries[name]["exact"] is cls.exact and entries[name]["description"]
    kv = {o["name"]: o for o in entries["quantize-kv"]["options"]}
    assert kv["group"]["bounds"] == "[1, 2147483647]" and kv["group"]["default"] == 32
    assert kv["method"]["bounds"] == "one of {xquant, xquant-cl, kivi}"
    assert entries["prune-global"]["needs"].startswith("calibration")
    assert entries["fuse-attention"]["needs"] == "nothing"


def test_passes_name_shows_one_pass(capsys):
    code, out, _ = _run(capsys, "passes", "prune-global")
    assert code == 0 and "max_fraction" in out and "lossy" in out and "skip-ffn" not in out


def test_bad_input_unknown_pass_name(capsys):
    code, _, err = _run(capsys, "passes", "prune-globl")
    assert code == 2 and "Did you mean 'prune-global'?" in " ".join(err.split())


def test_help_epilog_mentions_passes_and_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "'condfx passes' lists every pass" in out and "kv-small" in out


def _readme() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_recipe_table_is_the_shipped_recipes():
    import re

    rows = dict(re.findall(r"^\| `([a-z-]+)` \| `([^`]+)` \|$", _readme(), flags=re.MULTILINE))
    shipped = {name: recipes.spec_text(name) for name in recipes.names()}
    assert {k: rows.get(k) for k in shipped} == shipped


def test_readme_quotes_one_measuring_command_per_recipe():
    lines = _readme().splitlines()
    for name in ("kv-small", "long-context", "decode-fast"):
        quoted = [ln for ln in lines if ln.startswith("OMP_NUM_THREADS=1 condfx optimize ") and f"--recipe {name} " in ln]
        assert len(quoted) == 1, name
        assert "--calib ../shared/data/paul_graham_essays.txt" in quoted[0] and "--eval " in quoted[0]


def test_every_lossy_pass_of_a_recipe_is_calibrated_by_calib():
    from condfx.lifecycle import CALIBRATORS, needs
    from condfx.passes.base import Need
    from condfx.passes.spec import build_passes

    for name in ("kv-small", "long-context", "decode-fast"):
        for p in build_passes(recipes.spec_text(name)):
            if needs(p) is not Need.NONE:
                row = CALIBRATORS[p.name]
                assert row.before is not None or row.after is not None, (name, p.name)
    route = build_passes(recipes.spec_text("long-context"))[0]
    assert route.name == "route-attention" and needs(route) is Need.CALIBRATION  # the select form: no training

