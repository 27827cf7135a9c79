"""FP8 checkpoints: save/load round trips, the load's dtype path, and the two public formats.

The public-format writers below follow the formats' published descriptions (see
fp8_compile/checkpoint.py): ModelOpt FP8 stores an e4m3 ``weight`` with float32 per-tensor
``weight_scale`` and ``input_scale``; block-FP8 stores an e4m3 ``weight`` with a float32
``weight_scale_inv`` per [128, 128] block. Loading them must give exactly the model the
in-memory conversion with the same scales gives: the same FP8 bytes, the same scales, the same
kernels, hence bit-identical outputs.
"""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import fp8_compile
from fp8_compile import Decision, ScaledLinear, ops
from fp8_compile.blockwise import BlockScaledLinear, quantize_weight_blocks
from fp8_compile.calibration import calibrate, zoo_runs
from fp8_compile.checkpoint import load_quantized, save_quantized, skeleton
from fp8_compile.ops import quantize_weight
from fp8_compile.zoo import DITS

from conftest import SMALL, build, first_output
from test_moe import tiny_thinker, token_ids


def flux_skeleton() -> nn.Module:
    with skeleton():
        return DITS["flux"].build("tiny", torch.bfloat16, "cpu")


def saved_flux(tmp_path, options=None):
    """The tiny FLUX converted with ``options`` and saved: (model, report, file)."""
    model, _ = build("flux")
    report = fp8_compile.quantize_(model, options)
    save_quantized(model, tmp_path / "flux.safetensors")
    return model, report, tmp_path / "flux.safetensors"


def same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert torch.equal(sa[name].reshape(-1).view(torch.uint8), sb[name].reshape(-1).view(torch.uint8)), name  # bit for bit


@pytest.mark.parametrize(
    "options",
    [
        {"ignored_layers": ["ff_context"], "granularity": "per_tensor"},
        {"weight_block_size": [128, 128]},
        {"activation_scheme": "static", "activation_scales": {"transformer_blocks.0.attn.to_q": 0.02}, "missing_activation_scales": "dynamic"},
    ],
    ids=["dynamic", "block", "static"],
)
def test_round_trip_is_bit_identical(tmp_path, options):
    model, inputs = build("flux")
    report = fp8_compile.quantize_(model, options)
    save_quantized(model, tmp_path / "flux.safetensors")

    fresh = flux_skeleton()
    assert all(p.is_meta for p in fresh.parameters())
    loaded = load_quantized(fresh, tmp_path / "flux.safetensors")
    same_tensors(model, fresh)
    assert loaded.to_dict() == report.to_dict() and fp8_compile.quantization_report(fresh) is loaded
    for name, module in model.named_modules():
        if isinstance(module, ScaledLinear):
            twin = fresh.get_submodule(name)
            assert type(twin) is type(module) and twin.extra_repr() == module.extra_repr()
    with torch.no_grad():
        assert torch.equal(first_output(fresh(**inputs)), first_output(model(**inputs)))


def test_weights_packed_for_one_gemm_save_and_load_as_they_are(tmp_path):
    """Compiling lays to_q/to_k/to_v's tensors back to back in one storage (their fused GEMM
    reads them as one); such a model saves and loads bit for bit, each tensor on its own."""
    model, inputs = build("flux")
    fp8_compile.quantize_(model)
    attn = model.transformer_blocks[0].attn
    for name in ("weight", "weight_scale", "bias"):
        ops.packed_rows([getattr(m, name) for m in (attn.to_q, attn.to_k, attn.to_v)])
    assert attn.to_k.weight.untyped_storage().data_ptr() == attn.to_q.weight.untyped_storage().data_ptr()
    save_quantized(model, tmp_path / "flux.safetensors")
    fresh = flux_skeleton()
    load_quantized(fresh, tmp_path / "flux.safetensors")
    same_tensors(model, fresh)
    with torch.no_grad():
        assert torch.equal(first_output(fresh(**inputs)), first_output(model(**inputs)))


def test_moe_round_trip(tmp_path):
    model = tiny_thinker()
    fp8_compile.quantize_(model)
    save_quantized(model, tmp_path / "thinker.safetensors")
    with skeleton():
        fresh = type(model)(model.config).to(torch.bfloat16).eval()
    load_quantized(fresh, tmp_path / "thinker.safetensors")
    same_tensors(model, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=token_ids()).logits, model(input_ids=token_ids()).logits)


class CreatedTensors(TorchDispatchMode):
    """Records the dtype and shape of every tensor an operator creates."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.created.append((t.dtype, tuple(t.shape)))
        return out


def test_load_never_makes_a_bf16_copy_of_a_converted_weight(tmp_path):
    model, _ = build("flux")
    fp8_compile.quantize_(model)
    save_quantized(model, tmp_path / "flux.safetensors")
    converted = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, ScaledLinear)}
    fresh = flux_skeleton()
    with CreatedTensors() as mode:
        load_quantized(fresh, tmp_path / "flux.safetensors")
    high_precision = [(d, s) for d, s in mode.created if d.is_floating_point and d.itemsize >= 2 and s in converted]
    assert mode.created and not high_precision
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fresh.modules() if isinstance(m, ScaledLinear))


EXCLUDED = ["proj_out", "norm_out.linear"]  # the checkpoints' exclude list: globs over whole names
IGNORED = ["re:proj_out|norm_out\\.linear"]  # the same two layers as omni_fp8 ignore patterns


def calibrated_scales() -> dict[str, float]:
    model, _ = build("flux")
    runs = zoo_runs(DITS["flux"], model, 2, SMALL, torch.bfloat16, "cpu")
    return calibrate(model, runs, {"conditioning": "fp8", "ignored_layers": IGNORED}).scales


def write_modelopt(model: nn.Module, folder, input_scales: dict[str, float]) -> None:
    """A ModelOpt FP8 export of ``model``, in two shards with an index."""
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in input_scales:
            weight, scale = quantize_weight(module.weight, "per_tensor")
            tensors[f"{name}.weight"] = weight
            tensors[f"{name}.weight_scale"] = scale.reshape(())
            tensors[f"{name}.input_scale"] = torch.tensor(input_scales[name], dtype=torch.float32)
    folder.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, str(folder / file))
    weight_map = {n: file for file, shard in shards.items() for n in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quantization = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDED}
    (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quantization}))


def write_block_fp8(model: nn.Module, folder) -> None:
    """A block-FP8 checkpoint of ``model`` ([128, 128] blocks), one file."""
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in EXCLUDED:
            weight, scale_inv = quantize_weight_blocks(module.weight, (128, 128))
            tensors[f"{name}.weight"] = weight
            tensors[f"{name}.weight_scale_inv"] = scale_inv
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], "modules_to_not_convert": EXCLUDED,
        }
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("checkpoint_format", ["modelopt", "block_fp8"])
def test_public_checkpoint_loads_like_the_in_memory_conversion(tmp_path, checkpoint_format):
    model, inputs = build("flux")
    if checkpoint_format == "modelopt":
        scales = calibrated_scales()
        write_modelopt(model, tmp_path / "ckpt", scales)
        options = {"granularity": "per_tensor", "activation_scheme": "static", "activation_scales": scales}
        expected_reason = "static activation scale, from the checkpoint"
    else:
        write_block_fp8(model, tmp_path / "ckpt")
        options = {"weight_block_size": [128, 128]}
        expected_reason = "block 128x128, from the checkpoint"
    fp8_compile.quantize_(model, {**options, "conditioning": "fp8", "ignored_layers": IGNORED})

    fresh = flux_skeleton()
    report = load_quantized(fresh, tmp_path / "ckpt")
    reasons = {layer.name: (layer.decision, layer.reason) for layer in report.layers}
    assert reasons["proj_out"] == (Decision.BF16, "excluded by the checkpoint")
    assert reasons["transformer_blocks.1.ff.net.2"] == (Decision.FP8, expected_reason)
    assert len(report.by_decision(Decision.FP8)) == 48
    expected_class = ScaledLinear if checkpoint_format == "modelopt" else BlockScaledLinear
    assert type(fresh.transformer_blocks[0].attn.to_q) is expected_class
    same_tensors(model, fresh)
    with torch.no_grad():
        assert torch.equal(first_output(fresh(**inputs)), first_output(model(**inputs)))


def test_checkpoint_for_another_model_is_refused(tmp_path):
    saved_flux(tmp_path)
    with skeleton():
        other = DITS["wan"].build("tiny", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"flux.safetensors' holds a FluxTransformer2DModel, not a WanTransformer3DModel"):
        load_quantized(other, tmp_path / "flux.safetensors")
    (tmp_path / "plain").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain" / "model.safetensors"))
    with pytest.raises(ValueError, match="is not an FP8 checkpoint this package reads"):
        load_quantized(flux_skeleton(), tmp_path / "plain")
    (tmp_path / "plain" / "hf_quant_config.json").write_text("{\n")  # a truncated config names its file
    with pytest.raises(ValueError, match=r"hf_quant_config.json' is not valid JSON"):
        load_quantized(flux_skeleton(), tmp_path / "plain")


@pytest.mark.parametrize("checkpoint_format", ["own", "block_fp8"])
def test_checkpoint_of_another_configuration_is_refused(tmp_path, checkpoint_format):
    """The same class built with another width: refused while loading, naming a tensor and both
    shapes (it loaded, and failed later inside a forward)."""
    if checkpoint_format == "own":
        _, _, path = saved_flux(tmp_path)
    else:
        path = tmp_path / "ckpt"
        write_block_fp8(build("flux")[0], path)
    with skeleton():
        wider = DITS["flux"].build("tiny", torch.bfloat16, "cpu", num_attention_heads=4)
    with pytest.raises(ValueError, match=r"linear_1.weight is \[64, 256\] there but \[128, 256\] in this FluxTransformer2DModel"):
        load_quantized(wider, path)


def test_checkpoint_tensors_take_the_models_dtype(tmp_path):
    """A skeleton built in float16 gets its non-FP8 tensors in float16, not the stored bfloat16."""
    _, _, path = saved_flux(tmp_path)
    with skeleton():
        fresh = DITS["flux"].build("tiny", torch.float16, "cpu")
    load_quantized(fresh, path)
    assert fresh.norm_out.linear.bias.dtype == torch.float16 and fresh.x_embedder.weight.dtype == torch.float8_e4m3fn


def write_block_fp8_without(path, name: str) -> None:
    """A block-FP8 checkpoint of the tiny FLUX with the tensor ``name`` left out."""
    model, _ = build("flux")
    write_block_fp8(model, path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))


def test_checkpoint_missing_tensors_names_them(tmp_path):
    write_block_fp8_without(tmp_path / "ckpt", "norm_out.linear.bias")
    with pytest.raises(ValueError, match=r"lacks tensors of FluxTransformer2DModel: 'norm_out.linear.bias'"):
        load_quantized(flux_skeleton(), tmp_path / "ckpt")


def test_checkpoint_missing_scale_of_an_fp8_layer_names_it(tmp_path):
    write_block_fp8_without(tmp_path / "ckpt", "transformer_blocks.0.attn.to_q.weight_scale_inv")
    with pytest.raises(ValueError, match=r"ckpt' lacks tensor 'transformer_blocks.0.attn.to_q.weight_scale_inv'"):
        load_quantized(flux_skeleton(), tmp_path / "ckpt")


def test_a_loaded_checkpoint_compiles_without_quantizing_its_bf16_layers(tmp_path):
    """The layers a checkpoint keeps in BF16 (here by ignored_layers) stay BF16 when the loaded
    model is compiled with omni_fp8; they were quantized as not-yet-converted layers before."""
    _, report, path = saved_flux(tmp_path, {"ignored_layers": ["ff_context"]})
    _, inputs = build("flux")
    fresh = flux_skeleton()
    load_quantized(fresh, path)
    with torch.no_grad():
        torch.compile(fresh, backend="omni_fp8")(**inputs)
    assert fp8_compile.quantization_report(fresh).num_quantized == report.num_quantized
    assert type(fresh.transformer_blocks[0].ff_context.net[2]) is nn.Linear
