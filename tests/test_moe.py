"""MoE expert weights (3-D parameters, not nn.Linear) and the Qwen3-Omni thinker in FP8.

Bounds as in test_models.py: ~5% per FP8 GEMM on random data, 0.15 allowed for a whole model
and cosine >= 0.985; a single expert GEMM is held to the per-GEMM e4m3 bound (0.08).
"""

import copy

import torch
import torch.nn as nn

import fp8_compile
from fp8_compile import Decision
from fp8_compile.moe import Fp8Experts, grouped_fp8_linear, quantize_expert_weight
from fp8_compile.ops import quantize_activation

from conftest import cosine, rel_error

EXPERTS = [f"model.language_model.layers.{i}.mlp.experts" for i in range(2)]


def tiny_thinker():
    """Qwen3OmniMoeThinkerForConditionalGeneration with the tiny config of model_notes.md."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    text = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "interleaved": True},
    )
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64, deepstack_visual_indexes=[0],
    )
    audio = dict(
        num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, output_dim=32,
        downsample_hidden_size=8, max_source_positions=64, n_window=4, n_window_infer=16,
    )
    config = Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        audio_token_id=250, image_token_id=251, video_token_id=252, audio_start_token_id=249,
    )
    torch.manual_seed(0)
    return Qwen3OmniMoeThinkerForConditionalGeneration(config).to(torch.bfloat16).eval()


def token_ids() -> torch.Tensor:
    return torch.randint(0, 240, (2, 24), generator=torch.Generator().manual_seed(1))


def weight_bytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def test_thinker_language_model_in_fp8_towers_untouched():
    model = tiny_thinker()
    language = [model.model.language_model, model.lm_head]
    bf16_bytes = weight_bytes(*language)
    with torch.no_grad():
        reference = model(input_ids=token_ids()).logits
    report = fp8_compile.quantize_(model)

    decisions = {layer.name: (layer.decision, layer.reason) for layer in report.layers}
    for experts in EXPERTS:
        module = model.get_submodule(experts)
        assert isinstance(module, Fp8Experts)
        for weight in ("gate_up_proj", "down_proj"):
            assert decisions[f"{experts}.{weight}"] == (Decision.FP8, "expert weights, scaled per expert and channel")
            assert getattr(module, weight).dtype == torch.float8_e4m3fn
        assert module.gate_up_proj_scale.shape == (4, 64) and module.down_proj_scale.shape == (4, 32)
    assert model.get_submodule("model.language_model.layers.1.self_attn.q_proj").weight.dtype == torch.float8_e4m3fn
    towers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(("model.visual", "model.audio_tower"))]
    assert towers and all(decisions[n] == (Decision.BF16, "vision/audio tower") for n in towers)
    assert all(type(model.get_submodule(n)) is nn.Linear and model.get_submodule(n).weight.dtype == torch.bfloat16 for n in towers)

    with torch.no_grad():
        out = model(input_ids=token_ids()).logits
    assert rel_error(out, reference) < 0.15 and cosine(out, reference) > 0.985
    # Quantized weights: 1 byte per value plus one float32 scale per row (N of them per K values):
    # 0.5 + 2/K of BF16, K = 32 here. The embedding table and the norms stay BF16 (24% of the
    # tiny language model's bytes), which the whole-model ratio includes.
    fp8_bytes = weight_bytes(*language)
    assert report.bytes_after <= (0.5 + 2 / 32 + 0.01) * report.bytes_before
    assert fp8_bytes <= 0.7 * bf16_bytes
    print(f"thinker language model weights: {bf16_bytes} B in BF16 -> {fp8_bytes} B ({fp8_bytes / bf16_bytes:.2f}); "
          f"quantized layers {report.bytes_before} -> {report.bytes_after} B; logits error {rel_error(out, reference):.4f}")


def test_towers_are_converted_on_request():
    model = tiny_thinker()
    report = fp8_compile.quantize_(model, {"towers": "fp8"})
    assert not any(layer.reason == "vision/audio tower" for layer in report.layers)
    assert model.get_submodule("model.visual.blocks.0.mlp.linear_fc1").weight.dtype == torch.float8_e4m3fn


def test_ignore_patterns_reach_expert_weights():
    model = tiny_thinker()
    with torch.no_grad():
        reference = model(input_ids=token_ids()).logits
    report = fp8_compile.quantize_(model, {"ignored_layers": ["layers.1.mlp.experts", "*.experts.down_proj"]})
    decisions = {layer.name: layer.reason for layer in report.layers}
    assert decisions[f"{EXPERTS[1]}.gate_up_proj"] == "ignored by 'layers.1.mlp.experts'"
    assert decisions[f"{EXPERTS[0]}.down_proj"] == "ignored by '*.experts.down_proj'"
    assert decisions[f"{EXPERTS[0]}.gate_up_proj"] == "expert weights, scaled per expert and channel"
    kept = model.get_submodule(EXPERTS[1])
    assert type(kept).__name__ == "Qwen3OmniMoeThinkerTextExperts" and kept.gate_up_proj.dtype == torch.bfloat16
    mixed = model.get_submodule(EXPERTS[0])  # FP8 gate_up_proj next to a BF16 down_proj
    assert mixed.gate_up_proj.dtype == torch.float8_e4m3fn and mixed.down_proj.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_error(model(input_ids=token_ids()).logits, reference) < 0.15


def test_expert_gemm_matches_float64_per_expert():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 17, 1])  # an expert with no token, odd group sizes
    x = torch.randn(int(counts.sum()), 64, dtype=torch.bfloat16)
    w = torch.randn(4, 48, 64, dtype=torch.bfloat16) * torch.logspace(-2, 1, 4)[:, None, None]
    wq, scale = quantize_expert_weight(w)
    assert wq.dtype == torch.float8_e4m3fn and scale.shape == (4, 48)
    out = grouped_fp8_linear(x, wq, scale, torch.cumsum(counts, 0).to(torch.int32), fast_accum=False)
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    exact = torch.einsum("sk,snk->sn", x.double(), w.double()[expert_of_row])
    assert ((out.double() - exact).norm() / exact.norm()) < 0.08
    # each expert has its own scales: the small-magnitude expert is as accurate as the large one
    for e in (0, 2):
        rows = expert_of_row == e
        assert ((out[rows].double() - exact[rows]).norm() / exact[rows].norm()) < 0.08
    xq, x_scale = quantize_activation(x, "per_row")
    dequantized = torch.einsum("sk,snk->sn", xq.double() * x_scale.double(), (wq.double() * scale.double()[..., None])[expert_of_row])
    assert ((out.double() - dequantized).abs() <= 2**-8 * dequantized.abs() + 1e-3).all()


def test_fp8_experts_keep_their_dtypes_on_casts():
    model = tiny_thinker()
    fp8_compile.quantize_(model)
    copied = copy.deepcopy(model).to(torch.float16)
    for name in EXPERTS:
        original, experts = model.get_submodule(name), copied.get_submodule(name)
        for weight in ("gate_up_proj", "down_proj"):
            assert getattr(experts, weight).dtype == torch.float8_e4m3fn, (name, weight)
            assert getattr(experts, f"{weight}_scale").dtype == torch.float32, (name, weight)
            assert torch.equal(getattr(experts, weight).view(torch.uint8), getattr(original, weight).view(torch.uint8))
    assert copied.get_submodule("model.language_model.layers.0.mlp.gate").weight.dtype == torch.float16  # the cast itself ran


def test_fp8_experts_take_no_tokens():
    """A batch with no tokens (an empty routing) gives an empty output, as the BF16 experts do."""
    model = tiny_thinker()
    fp8_compile.quantize_(model)
    experts = model.get_submodule(EXPERTS[0])
    hidden = torch.randn(0, experts.gate_up_proj.shape[-1], dtype=torch.bfloat16)
    with torch.no_grad():
        out = experts(hidden, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bfloat16))
    assert out.shape == (0, hidden.shape[-1])
