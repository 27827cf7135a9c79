"""omni_fp8 on tiny random-weight instances of every denoiser class in scope.

Error bound: e4m3 rounds each operand of a GEMM to 3 mantissa bits, an RMS error of about
2**-4/sqrt(3) = 3.6% per operand, so ~5% (sqrt(2) x 3.6%) on a GEMM's output; residual paths
keep a stack of blocks near that single-GEMM figure. We allow 3x (0.15) and cosine >= 0.985 vs
the BF16 module; a wrong or missing scale, a transposed weight or a layer wired to another
layer's weight gives errors of 0.3 and more. Measured on CPU: 0.03-0.07.
"""

import gc
import weakref

import pytest
import torch
import torch.nn as nn

import fp8_compile
from fp8_compile import Decision, ScaledLinear
from fp8_compile.zoo import DITS

from conftest import DEVICES, build, cosine, first_output, rel_error, unique_graphs

# name: (ignore pattern, expected fp8 / weight-only / bf16 layer counts, a conditioning layer, an FP8 layer)
CASES = {
    "flux": ("ff_context", (33, 13, 4), "transformer_blocks.0.norm1.linear", "single_transformer_blocks.1.proj_out"),
    "flux2_klein": ("ff_context", (17, 6, 2), "double_stream_modulation_img.linear", "transformer_blocks.0.attn.to_q"),
    "qwen_image": ("img_mlp", (23, 7, 4), "transformer_blocks.1.img_mod.1", "transformer_blocks.1.txt_mlp.net.2"),
    "wan": ("ffn", (19, 3, 4), "condition_embedder.time_proj", "blocks.1.attn2.to_k"),
    "z_image": ("feed_forward.w2", (27, 5, 5), "layers.0.adaLN_modulation.0", "layers.1.feed_forward.w1"),
    "hunyuan_video15": ("token_refiner", (31, 11, 7), "transformer_blocks.0.norm1_context.linear", "transformer_blocks.1.ff.net.2"),
    "glm_image": ("ff", (14, 7, 4), "time_condition_embed.timestep_embedder.linear_1", "transformer_blocks.0.attn1.to_out.0"),
}


def quantized_layer_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes now, bytes in BF16) of the weight, scale and bias of every converted layer."""
    now = bf16 = 0
    for module in model.modules():
        if isinstance(module, ScaledLinear):
            tensors = [module.weight, module.weight_scale, module.bias]
            now += sum(t.numel() * t.element_size() for t in tensors if t is not None)
            bf16 += 2 * module.weight.numel() + (2 * module.bias.numel() if module.bias is not None else 0)
    return now, bf16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_denoiser_in_fp8(name, device):
    pattern, (n_fp8, n_weight_only, n_bf16), conditioning_layer, fp8_layer = CASES[name]
    model, inputs = build(name, device=device)
    with torch.no_grad():
        reference = first_output(model(**inputs))
    old_weight = weakref.ref(model.get_submodule(fp8_layer).weight)

    compiled = torch.compile(model, backend="omni_fp8", options={"ignored_layers": [pattern]})
    with torch.no_grad():
        outputs = [first_output(compiled(**inputs)) for _ in range(2)]
        graphs = unique_graphs()
        outputs.append(first_output(compiled(**inputs)))
    assert unique_graphs() == graphs, "a third call with the same shapes compiled again"

    report = fp8_compile.quantization_report(model)
    counts = tuple(len(report.by_decision(d)) for d in (Decision.FP8, Decision.WEIGHT_ONLY, Decision.BF16))
    assert counts == (n_fp8, n_weight_only, n_bf16), report.summary()
    ignored = [layer.name for layer in report.layers if layer.reason == f"ignored by {pattern!r}"]
    assert ignored and all(type(model.get_submodule(n)) is nn.Linear for n in ignored)
    assert all(model.get_submodule(n).weight.dtype == torch.bfloat16 for n in ignored)
    assert model.get_submodule(conditioning_layer).quantize_input is False
    assert model.get_submodule(fp8_layer).quantize_input is True
    assert model.dtype == torch.bfloat16  # pipelines cast latents to it

    for out in outputs:
        assert torch.isfinite(out).all()
        assert rel_error(out, reference) < 0.15 and cosine(out, reference) > 0.985
    print(f"{name} on {device}: relative error vs BF16 {rel_error(outputs[-1], reference):.4f}, "
          f"cosine {cosine(outputs[-1], reference):.5f}")
    now, bf16 = quantized_layer_bytes(model)
    assert now <= 0.55 * bf16
    gc.collect()
    assert old_weight() is None, "the BF16 weight of a converted layer is still alive"


def test_a_misspelt_model_size_is_refused():
    """Any size but 'tiny' built the full-size model (billions of parameters) without a word."""
    with pytest.raises(ValueError, match="model size must be 'tiny' or 'full', got 'tinny'"):
        DITS["flux"].build("tinny", torch.bfloat16, "cpu")
