"""Static activation scales: calibration, the scales file, its checks, and the static FP8 path.

Error bound for static scaling: a calibrated per-tensor scale puts the largest calibration input
on 448, like a dynamic per-tensor scale does, so on inputs drawn like the calibration ones the
error is that of per-tensor FP8: ~5% per GEMM, well under the 0.15 the model tests allow (see
test_models.py). A wrong scale (10x too large: values fall into e4m3's subnormals; 10x too
small: everything saturates) gives errors of 0.3 and more.
"""

import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from torch._inductor.utils import run_and_get_code

import fp8_compile
from fp8_compile import Decision, ScaledLinear, ops
from fp8_compile.activation_scales import ActivationScales, load_activation_scales, save_activation_scales
from fp8_compile.calibration import calibrate, main as calibration_main, pipeline_runs, zoo_runs
from fp8_compile.zoo import DITS

from conftest import DEVICES, SMALL, build, first_output, rel_error


def _mlp(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    return mlp.to(device, torch.bfloat16).eval()


def _mlp_input(device: str = "cpu") -> torch.Tensor:
    return torch.randn(2, 32, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.fixture(scope="module")
def flux_scales(tmp_path_factory):
    """Scales calibrated on the tiny FLUX over 3 steps, written to a file."""
    model, _ = build("flux")
    runs = zoo_runs(DITS["flux"], model, 3, SMALL, torch.bfloat16, "cpu")
    scales = calibrate(model, runs, {"ignored_layers": ["ff_context"]})
    path = tmp_path_factory.mktemp("scales") / "flux.safetensors"
    save_activation_scales(scales, path)
    return path, scales


def test_a_calibrated_scale_is_the_largest_input_over_448():
    """Over two runs, each W8A8 layer's scale is max |input| / 448: the largest input lands on
    e4m3's largest value. (The 0.15 bounds elsewhere would pass a scale several times off.)"""
    model = _mlp()
    runs = [(_mlp_input(),), (torch.randn(2, 32, 64, dtype=torch.bfloat16) * 3,)]
    scales = calibrate(model, runs).scales
    with torch.no_grad():
        first_inputs = [model[0](x) for (x,) in runs]
        second_inputs = [model[2](model[1](h)) for h in first_inputs]

    def amax(tensors):
        return max(t.float().abs().max().item() for t in tensors)

    assert scales["1"] == pytest.approx(amax(first_inputs) / 448, rel=1e-6)
    assert scales["3"] == pytest.approx(amax(second_inputs) / 448, rel=1e-6)


def test_calibration_file_names_model_layers_and_config(flux_scales):
    path, scales = flux_scales
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        layers = set(f.keys())
    assert metadata["model_class"] == "FluxTransformer2DModel"
    assert json.loads(metadata["layers"]) == sorted(layers)
    assert json.loads(metadata["config"])["ignored_layers"] == ["ff_context"]
    assert json.loads(metadata["calibration"]) == {"method": "max", "forward_calls": 3}
    # the W8A8 layers of that config: not the ignored ones, not the weight-only conditioning ones
    assert len(layers) == 33 and not any("ff_context" in n or "norm1.linear" in n for n in layers)
    assert load_activation_scales(path).scales == pytest.approx(scales.scales)


def test_percentile_scales_clip_below_the_max(flux_scales):
    _, by_max = flux_scales
    model, _ = build("flux")
    runs = zoo_runs(DITS["flux"], model, 3, SMALL, torch.bfloat16, "cpu")
    by_percentile = calibrate(model, runs, {"ignored_layers": ["ff_context"]}, method="percentile", percentile=99.0)
    assert by_percentile.scales.keys() == by_max.scales.keys()
    ratios = [by_percentile.scales[n] / by_max.scales[n] for n in by_max.scales]
    assert max(ratios) <= 1.0 and min(ratios) < 0.9


def test_static_model_is_close_to_bf16(flux_scales):
    path, scales = flux_scales
    model, inputs = build("flux")
    with torch.no_grad():
        reference = first_output(model(**inputs))
    report = fp8_compile.quantize_(model, {"ignored_layers": ["ff_context"], "activation_scheme": "static", "activation_scales": str(path)})
    static = [layer for layer in report.layers if layer.reason == "static activation scale"]
    assert len(static) == len(scales.scales) == len(report.by_decision(Decision.FP8))
    for layer in static:
        module = model.get_submodule(layer.name)
        assert module.input_scale.dtype == torch.float32 and module.input_scale.item() == pytest.approx(scales.scales[layer.name])
    with torch.no_grad():
        out = first_output(model(**inputs))
    assert rel_error(out, reference) < 0.15


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_the_static_scale_is_the_one_used(granularity, device):
    """A static scale far below the dynamic one (|x| up to ~12 saturates at 448 x 1e-3): the
    layer's output is exactly the GEMM of the statically quantized input, eager and compiled,
    and far from what dynamic scaling gives."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16) * 4
    dynamic = nn.Sequential(nn.Linear(64, 32)).to(device=device, dtype=torch.bfloat16)
    dynamic.load_state_dict({"0." + k: v for k, v in layer.state_dict().items()})
    static = nn.Sequential(layer)
    fp8_compile.quantize_(dynamic, {"granularity": granularity})
    fp8_compile.quantize_(static, {"granularity": granularity, "activation_scheme": "static", "activation_scales": {"0": 1e-3}})
    with torch.no_grad():
        q = static[0]
        x_fp8 = ops.quantize_activation_static(x, q.input_scale)
        x_scale = ops.static_activation_scale(q.input_scale, x, q.weight_scale)
        expected = ops.fp8_matmul(x_fp8, x_scale, q.weight, q.weight_scale, q.bias, x.dtype, q.fast_accum)
        assert torch.equal(static(x), expected)
        assert rel_error(torch.compile(static, backend="omni_fp8")(x), expected) < 1e-2
        assert rel_error(static(x), dynamic(x)) > 0.3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_static_quantize_fuses_into_its_producer(granularity, device):
    """Compiled, the static quantize adds no kernel and no reduction: it is a divide-clamp-cast
    inside the kernel of the op that produced the activation (LayerNorm, GELU). Per-row weights
    need the scale broadcast to [M, 1] for _scaled_mm, which may take a small kernel per layer
    (2 here) where Inductor does not fuse it."""
    x = _mlp_input(device)
    with torch.no_grad():
        _, (bf16_code, *_) = run_and_get_code(torch.compile(_mlp(device)), x)
        model = _mlp(device)
        scales = calibrate(model, [(x,)])
        fp8_compile.quantize_(model, {"granularity": granularity, "activation_scheme": "static", "activation_scales": scales.scales})
        _, (code, *_) = run_and_get_code(torch.compile(model, backend="omni_fp8"), x)
    kernels = set(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\b", code))
    bf16_kernels = set(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\b", bf16_code))
    assert len(bf16_kernels) <= len(kernels) <= len(bf16_kernels) + (2 if granularity == "per_row" else 0)
    assert not any("amax" in k for k in kernels)
    assert any("layer_norm" in k and "div" in k for k in kernels) and any("gelu" in k and "div" in k for k in kernels)
    assert len(re.findall(r"\b_scaled_mm(?:\.default)?\(", code)) == 2


def test_bad_scales_fail_before_any_weight_is_touched(tmp_path):
    model = _mlp()
    scales = calibrate(model, [(_mlp_input(),)])

    def refused(value, match, **options):
        with pytest.raises(ValueError, match=match):
            fp8_compile.quantize_(model, {"activation_scheme": "static", "activation_scales": value, **options})
        assert not any(isinstance(m, ScaledLinear) for m in model.modules())

    other = tmp_path / "other.safetensors"
    save_activation_scales(ActivationScales(scales.scales, "x", model_class="FluxTransformer2DModel"), other)
    refused(str(other), r"other.safetensors' holds activation scales calibrated on FluxTransformer2DModel, not on Sequential")

    partial = tmp_path / "partial.safetensors"
    save_activation_scales(ActivationScales({"1": scales.scales["1"]}, "x", model_class="Sequential"), partial)
    refused(str(partial), r"partial.safetensors' has no activation scale for 1 FP8 layers of Sequential: '3'")

    refused({**scales.scales, "9": 1.0}, r"not linear layers of Sequential: '9'")
    refused({"1": float("nan"), "3": 0.0}, r"scales must be finite and > 0; bad layers: \['1', '3'\]")
    with pytest.raises(ValueError, match=r"bad scales for layers '3'"):
        ActivationScales({"1": 1.0, "3": float("inf")}, "scales.safetensors")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(other.read_bytes()[:40])
    refused(str(corrupt), r"corrupt.safetensors' is not a readable safetensors file")
    refused(str(tmp_path / "missing.safetensors"), r"no such file .*missing.safetensors")


def test_bad_scales_fail_before_the_backend_compiles(tmp_path):
    model = _mlp()
    scales_file = tmp_path / "partial.safetensors"
    save_activation_scales(ActivationScales({"1": 0.01}, "x", model_class="Sequential"), scales_file)
    compiled = torch.compile(model, backend="omni_fp8", options={"activation_scheme": "static", "activation_scales": str(scales_file)})
    # Raised by the conversion on the first call, outside Dynamo's backend wrapper: a ValueError
    # that names the file, the layer and the ways out.
    message = r"partial.safetensors' has no activation scale for 1 FP8 layers of Sequential: '3'; .*'missing_activation_scales'"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        compiled(_mlp_input())
    assert not any(isinstance(m, ScaledLinear) for m in model.modules())


def test_layers_without_a_scale_can_fall_back_to_dynamic():
    model = _mlp()
    x = _mlp_input()
    with torch.no_grad():
        reference = model(x)
    report = fp8_compile.quantize_(
        model, {"activation_scheme": "static", "activation_scales": {"1": 0.02}, "missing_activation_scales": "dynamic"}
    )
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons == {"1": "static activation scale", "3": "dynamic activation scale: no static scale"}
    assert "fp8 with: 1 static activation scale, 1 dynamic activation scale: no static scale" in report.summary()
    assert model[1].input_scale is not None and model[3].input_scale is None
    with torch.no_grad():
        assert rel_error(model(x), reference) < 0.15


def test_calibration_command_writes_a_scales_file(tmp_path, capsys):
    out = tmp_path / "wan.safetensors"
    calibration_main(["--model", "wan", "--steps", "2", "--method", "percentile", "--out", str(out), "--device", "cpu"])
    scales = load_activation_scales(out)
    # exactly the W8A8 layers of the tiny Wan under the default config (23 of its 26 linears;
    # the 3 conditioning layers are weight-only and take no activation scale)
    wan, _ = build("wan")
    w8a8 = {layer.name for layer in fp8_compile.quantize_(wan).by_decision(Decision.FP8)}
    assert scales.model_class == "WanTransformer3DModel" and set(scales.scales) == w8a8 and len(w8a8) == 23
    assert json.loads(scales.metadata["calibration"]) == {"method": "percentile", "forward_calls": 2, "percentile": 99.99}
    assert "activation scales of WanTransformer3DModel" in capsys.readouterr().out


def test_calibration_over_a_whole_pipeline(tmp_path):
    from fp8_compile.tiny_pipelines import write_tiny_pipeline

    folder = write_tiny_pipeline("flux", tmp_path / "pipe")
    out = tmp_path / "flux.safetensors"
    calibration_main(["--pipeline", str(folder), "--prompts", "a cat", "a dog", "--steps", "3", "--out", str(out), "--device", "cpu"])
    scales = load_activation_scales(out)
    # both prompts go through the denoiser together at each of the 3 steps (FLUX.1 has no CFG pass)
    assert json.loads(scales.metadata["calibration"])["forward_calls"] == 3
    # the pipeline's denoiser has the tiny FLUX's layers: a scale for each of its 37 W8A8 layers
    flux, _ = build("flux")
    w8a8 = {layer.name for layer in fp8_compile.quantize_(flux).by_decision(Decision.FP8)}
    assert scales.model_class == "FluxTransformer2DModel" and set(scales.scales) == w8a8 and len(w8a8) == 37


def test_calibration_names_a_component_the_pipeline_lacks(tmp_path):
    from fp8_compile.tiny_pipelines import write_tiny_pipeline

    folder = write_tiny_pipeline("flux", tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"--component 'transformer_2': FluxPipeline has no such model"):
        calibration_main(["--pipeline", str(folder), "--component", "transformer_2", "--out", str(tmp_path / "x.safetensors"), "--device", "cpu"])


def test_calibrating_wan_picks_an_expert_and_warns_of_the_other(tmp_path, caplog):
    """Wan2.2's experts share a class and layer names: the default (transformer) warns that
    transformer_2 needs its own run, and --component transformer_2 calibrates that one."""
    from fp8_compile.tiny_pipelines import write_tiny_pipeline

    folder = write_tiny_pipeline("wan", tmp_path / "pipe")
    first, _ = pipeline_runs(str(folder), ["a cat"], 1, 64, 64, "cpu")
    assert any("calibrate it on its own with --component transformer_2" in r.getMessage() for r in caplog.records)
    caplog.clear()
    second, _ = pipeline_runs(str(folder), ["a cat"], 1, 64, 64, "cpu", component="transformer_2")
    assert second is not first and type(second) is type(first)
    assert not any("--component transformer_2" in r.getMessage() for r in caplog.records)
