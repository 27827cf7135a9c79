"""The text encoders of the pipelines in scope, in FP8: tiny random-weight instances of the real
transformers classes (the ones fp8_compile.tiny_pipelines puts in its pipelines).

Error bound, as for the denoisers (test_models.py): e4m3 rounds each GEMM operand to 3 mantissa
bits, ~5% relative RMS error on a GEMM's output, and the residual stream keeps a 2-layer stack
near that figure. We allow 3x (relative error < 0.15) and cosine > 0.985 on the embedding the
pipeline uses; a wrong scale, a transposed weight or a layer fed an FP8-cast input gives 0.3 and
more (or NaN). Measured on CPU: relative error 0.04-0.08.
"""

import pytest
import torch
import torch.nn as nn

import fp8_compile
from fp8_compile import Decision
from fp8_compile import tiny_pipelines as tiny

from conftest import cosine, rel_error, unique_graphs

PROMPTS = ["A cat sitting on a windowsill", "a red bicycle leaning on a brick wall at dusk"]


def _last_hidden(out):
    return out.last_hidden_state


# name: (encoder builder, tokenizer builder, the embedding its pipeline uses,
#        expected (fp8, weight-only, bf16) counts among the language-model layers, a layer kept in BF16 and why)
ENCODERS = {
    # FLUX.1 takes CLIP's pooled output
    "clip": (tiny.clip_text_encoder, tiny.clip_tokenizer, lambda out: out.pooler_output, (12, 0, 0), None),
    # FLUX.1 (T5) and Wan2.2 (UMT5): the last hidden state; their FFN casts its input to wo's dtype
    "t5": (tiny.t5_text_encoder, tiny.t5_tokenizer, _last_hidden, (12, 0, 2),
           ("encoder.block.1.layer.1.DenseReluDense.wo", "the model reads its weight dtype")),
    "umt5": (tiny.umt5_text_encoder, tiny.t5_tokenizer, _last_hidden, (12, 0, 2),
             ("encoder.block.0.layer.1.DenseReluDense.wo", "the model reads its weight dtype")),
    # Z-Image (and FLUX.2-klein) take Qwen3's second-to-last hidden state
    "qwen3": (tiny.qwen3_text_encoder, tiny.qwen_tokenizer, lambda out: out.hidden_states[-2], (14, 0, 0), None),
    # Qwen-Image (and HunyuanVideo-1.5): the Qwen2.5-VL language model's last hidden state
    "qwen2_5_vl": (tiny.qwen2_5_vl_text_encoder, tiny.qwen_tokenizer, lambda out: out.hidden_states[-1], (15, 0, 0), None),
}
VISION_TOWER_PREFIXES = ("visual.", "model.visual.")  # Qwen2.5-VL: never run for text


def build_encoder(name: str):
    """A BF16 tiny encoder, its tokenized prompts and a function picking the pipeline's embedding."""
    make_encoder, make_tokenizer, embedding, _, _ = ENCODERS[name]
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    encoder = make_encoder(tokenizer).to(torch.bfloat16).eval()
    inputs = tokenizer(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    return encoder, dict(inputs), embedding


def run(encoder: nn.Module, inputs: dict, embedding) -> torch.Tensor:
    with torch.no_grad():
        return embedding(encoder(**inputs, output_hidden_states=True)).float()


def language_model_counts(model: nn.Module) -> tuple[int, int, int]:
    layers = [
        layer for layer in fp8_compile.quantization_report(model).layers
        if not layer.name.startswith(VISION_TOWER_PREFIXES)
    ]
    return tuple(sum(layer.decision is d for layer in layers) for d in (Decision.FP8, Decision.WEIGHT_ONLY, Decision.BF16))


def check_fp8_encoder(name: str, model: nn.Module, out: torch.Tensor, reference: torch.Tensor) -> None:
    *_, counts, kept = ENCODERS[name]
    report = fp8_compile.quantization_report(model)
    assert language_model_counts(model) == counts, report.summary()
    if kept is not None:
        layer_name, reason = kept
        assert type(model.get_submodule(layer_name)) is nn.Linear
        assert next(layer.reason for layer in report.layers if layer.name == layer_name) == reason
    assert model.dtype == torch.bfloat16  # pipelines cast the embeddings to it
    assert torch.isfinite(out).all()
    assert rel_error(out, reference) < 0.15 and cosine(out, reference) > 0.985, (
        f"relative error {rel_error(out, reference):.4f}, cosine {cosine(out, reference):.5f}"
    )


@pytest.mark.parametrize("name", list(ENCODERS))
def test_quantize_text_encoder(name):
    encoder, inputs, embedding = build_encoder(name)
    reference = run(encoder, inputs, embedding)
    fp8_compile.quantize_(encoder)
    check_fp8_encoder(name, encoder, run(encoder, inputs, embedding), reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENCODERS))
def test_backend_compiles_text_encoder(name):
    """torch.compile(backend="omni_fp8") converts the encoder on its first call, no quantize_ needed."""
    encoder, inputs, embedding = build_encoder(name)
    reference = run(encoder, inputs, embedding)
    compiled = torch.compile(encoder, backend="omni_fp8")
    outputs = [run(compiled, inputs, embedding) for _ in range(2)]
    graphs = unique_graphs()
    outputs.append(run(compiled, inputs, embedding))
    assert unique_graphs() == graphs, "a third call with the same shapes compiled again"
    for out in outputs:
        check_fp8_encoder(name, encoder, out, reference)


def test_tied_lm_head_stays_bf16():
    """A tied lm_head shares the token embedding's weight: converting it would keep the BF16 copy
    alive and tie_weights() would put the BF16 weight back into the FP8 layer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        reference = model(torch.arange(8)[None]).logits
    report = fp8_compile.quantize_(model)
    assert next(layer.reason for layer in report.layers if layer.name == "lm_head") == "weight tied to another module"
    assert report.num_quantized == 7  # every other linear (attention and MLP) is FP8
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.tie_weights()
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    # Bound as in the module docstring; measured 0.035-0.042 (cosine 0.9991-0.9994) over seeds.
    assert logits.shape == (1, 8, 256) and torch.isfinite(logits).all()
    assert rel_error(logits, reference) < 0.15 and cosine(logits, reference) > 0.985
