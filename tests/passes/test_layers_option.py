"""The one ``layers=`` selection of passes/base.py: config check, selection and missing layers."""

from __future__ import annotations

import pytest

from condfx.passes.base import PassError, layer_indices, missing_layers, select_layers


def test_matches_every_layer_without_option_and_the_requested_ones_with_it():
    assert select_layers("p", None, [2, 0, 1]) == {0, 1, 2}
    assert select_layers("p", (1,), [0, 1, 2]) == {1}
    assert missing_layers((3, 1, 5), [0, 1]) == [3, 5]


def test_rejects_missing_layers_in_one_sentence_naming_pass_missing_and_existing():
    with pytest.raises(PassError, match=r"some-pass: layers \[3, 5\] do not exist; the graph has L2A layers \[0, 1\]"):
        select_layers("some-pass", (1, 3, 5), [1, 0], "L2A", "the")


@pytest.mark.parametrize("bad", [["x"], [-1], 3, [True]])
def test_rejects_bad_layer_indices(bad):
    with pytest.raises(ValueError, match=r"^SomeConfig.layers must be a list of non-negative layer indices or None; got "):
        layer_indices(bad, "SomeConfig.layers")
    assert layer_indices([0, 2], "SomeConfig.layers") == (0, 2) and layer_indices(None, "f") is None
