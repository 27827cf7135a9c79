"""The benchmark scripts' own bookkeeping (their GPU rows are not run here)."""

import sys
from pathlib import Path

import torch
from torch.testing._internal.two_tensor import TwoTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_dit import weight_gb  # noqa: E402


def test_weight_gb_counts_a_tensor_subclass_by_what_it_holds():
    """A tensor subclass's own numel x element size is not what it holds: torchao's float8
    weights report the BF16 size they stand for (its FLUX rows read 23.8 GB), and this
    two-tensor subclass holds twice its apparent size."""
    model = torch.nn.Linear(256, 128, bias=False)
    inner = torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    assert weight_gb(model) == 128 * 256 * 4 / 1e9
    model.weight = torch.nn.Parameter(TwoTensor(inner, inner), requires_grad=False)
    assert model.weight.element_size() == 1 and weight_gb(model) == 2 * 128 * 256 / 1e9
