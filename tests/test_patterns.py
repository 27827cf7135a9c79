import logging

import pytest
import torch
import torch.nn as nn

import fp8_compile
from fp8_compile.patterns import LayerPattern, closest_names

NAME = "transformer_blocks.3.img_mlp.net.0.proj"


@pytest.mark.parametrize(
    "pattern, matches",
    [
        ("img_mlp", True),  # one component
        ("img_mlp.net", True),  # a run of components
        ("transformer_blocks.3", True),
        (NAME, True),  # the full name
        ("mlp", False),  # components compare whole
        ("net.proj", False),  # not contiguous
        ("*.proj", True),  # glob over the whole name
        ("*.to_q", False),
        ("transformer_blocks.[0-3].*", True),
        ("re:.*img_mlp\\.net\\.\\d\\.proj", True),  # regex, full match
        ("re:img_mlp", False),
    ],
)
def test_pattern_forms(pattern, matches):
    assert LayerPattern(pattern).matches(NAME) is matches


def test_to_q_does_not_match_add_q_proj():
    assert not LayerPattern("to_q").matches("transformer_blocks.0.attn.add_q_proj")


def test_closest_names():
    names = ["blocks.0.img_mlp.net.0.proj", "blocks.0.txt_mlp.net.2", "blocks.0.attn.to_q"]
    assert closest_names("img_mlps", names)[0] == "img_mlp"
    assert closest_names("attn.to_qq", names)[0] == "attn.to_q"


def test_unmatched_pattern_warns_with_closest_names(caplog):
    model = nn.Sequential()
    model.add_module("img_mlp", nn.Linear(32, 32, dtype=torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="fp8_compile"):
        fp8_compile.quantize_(model, {"ignored_layers": ["img_mpl"]})
    assert "ignored_layers pattern 'img_mpl' matches no linear layer" in caplog.text
    assert "closest layer names: img_mlp" in caplog.text
