"""The lowering chosen per device (capabilities mocked), and weight-only FP8 forced."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fp8_compile
from fp8_compile.hardware import select_lowering
from fp8_compile.passes import Lowering

from conftest import DEVICES, build, cosine, first_output, rel_error

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be an NVIDIA GPU of a given compute capability."""

    def set_capability(major, minor, hip=None):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm{major}{minor}")
        monkeypatch.setattr(torch.version, "hip", hip)

    return set_capability


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), Lowering.W8A8), ((8, 9), Lowering.W8A8), ((10, 0), Lowering.W8A8), ((8, 0), Lowering.WEIGHT_ONLY), ((8, 6), Lowering.WEIGHT_ONLY)],
)
def test_lowering_follows_the_compute_capability(gpu, capability, expected):
    gpu(*capability)
    assert select_lowering(CUDA) is expected
    assert select_lowering(CUDA, "weight_only") is Lowering.WEIGHT_ONLY  # forcible everywhere


def test_forcing_w8a8_without_fp8_tensor_cores_is_an_error(gpu):
    gpu(8, 0)
    with pytest.raises(ValueError, match="'lowering'='w8a8' needs FP8 tensor cores"):
        select_lowering(CUDA, "w8a8")


@pytest.mark.parametrize(
    "setup, device, message",
    [
        ((7, 5), CUDA, "needs an NVIDIA GPU of compute capability 8.0 or newer; GPU sm75 is 7.5"),
        ((9, 4, "6.4"), CUDA, "does not support ROCm device cuda:0: its FP8 format is e4m3fnuz"),
        ((9, 0), torch.device("xpu"), "no FP8 lowering for device type 'xpu'"),
    ],
)
def test_unsupported_devices_get_a_clear_error(gpu, setup, device, message):
    gpu(*setup)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        select_lowering(device)


def test_cpu_runs_the_w8a8_reference():
    assert select_lowering(torch.device("cpu")) is Lowering.W8A8
    assert select_lowering(torch.device("cpu"), "weight_only") is Lowering.WEIGHT_ONLY


@pytest.mark.parametrize("device", DEVICES)
def test_forced_weight_only_runs_every_fp8_layer_weight_only(device):
    """Weight-only keeps the activations in BF16: only the weights are rounded (2**-4 relative
    at most, ~3.6% RMS), so the error vs BF16 is below W8A8's; 0.1 allows for the tiny FLUX's
    sensitivity (its BF16 eager and compiled outputs differ by ~4%)."""
    model, inputs = build("flux", device=device)
    with torch.no_grad():
        reference = first_output(model(**inputs))
    report = fp8_compile.quantize_(model)
    n_layers = report.num_quantized  # 37 W8A8 + 13 weight-only
    compiled = torch.compile(model, backend="omni_fp8", options={"lowering": "weight_only"})
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(compiled, **inputs)
    out = first_output(out)
    assert not re.search(r"\b_scaled_mm\(", code)  # no FP8 x FP8 GEMM left
    # The graph still takes every converted layer's FP8 weight (none was dequantized ahead of
    # time into a BF16 copy), and on the CPU each layer is one BF16 GEMM on its dequantized weight.
    assert n_layers == 50
    assert len(re.findall(r"rand_strided\([^\n]*dtype=torch\.float8_e4m3fn\)", code)) == n_layers
    if device == "cpu":
        assert len(re.findall(r"\bextern_kernels\.(?:add)?mm\(", code)) == n_layers
    assert rel_error(out, reference) < 0.1 and cosine(out, reference) > 0.99
    print(f"weight-only on {device}: relative error vs BF16 {rel_error(out, reference):.4f}")
