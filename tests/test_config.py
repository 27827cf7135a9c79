import pytest
import torch

from fp8_compile import Fp8Config


def test_defaults():
    config = Fp8Config.from_options(None)
    assert config.method == "fp8"
    assert config.ignored_layers == ()
    assert config.activation_scheme == "dynamic"
    assert config.weight_block_size is None
    assert config.granularity == "per_row"


def test_block_size_is_normalised_to_a_pair():
    assert Fp8Config.from_options({"weight_block_size": [128, 64]}).weight_block_size == (128, 64)


def test_single_pattern_string_is_one_pattern():
    assert Fp8Config.from_options({"ignored_layers": "img_mlp"}).ignored_layers == ("img_mlp",)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ignored_layer": ["x"]}, "unknown omni_fp8 option 'ignored_layer' (did you mean 'ignored_layers'?)"),
        ({"method": "int8"}, "'method' must be one of ['fp8']"),
        ({"ignored_layers": 3}, "'ignored_layers' must be a list of non-empty layer-name patterns"),
        ({"ignored_layers": ["ok", ""]}, "'ignored_layers' must be a list of non-empty layer-name patterns"),
        ({"ignored_layers": ["re:("]}, "option 'ignored_layers': layer pattern 're:(' is not a valid regular expression"),
        ({"conditioning_layers": ["re:["]}, "option 'conditioning_layers': layer pattern 're:[' is not a valid"),
        ({"activation_scheme": "dynamik"}, "did you mean 'dynamic'"),
        ({"activation_scheme": "static"}, "'activation_scheme'='static' and 'activation_scales' go together"),
        ({"activation_scales": {"a": 1.0}}, "'activation_scheme'='static' and 'activation_scales' go together"),
        ({"activation_scheme": "static", "activation_scales": "/nonexistent.safetensors"}, "no such file"),
        ({"activation_scheme": "static", "activation_scales": 3}, "must be a scales file written by fp8_compile.calibration"),
        ({"activation_scheme": "static", "activation_scales": {"a": 0.0}}, "finite and > 0; bad layers: ['a']"),
        ({"activation_scheme": "static", "activation_scales": {"a": 1.0, "b": "x", "c": None}}, "bad layers: ['b', 'c']"),
        ({"missing_activation_scales": "skip"}, "'missing_activation_scales' must be one of ['error', 'dynamic']"),
        ({"weight_block_size": [128, 100]}, "'weight_block_size' must be [block_n, block_k], powers of two from 32 to 512"),
        ({"weight_block_size": 128}, "'weight_block_size' must be [block_n, block_k]"),
        ({"weight_block_size": [128, 128], "activation_scheme": "static", "activation_scales": {"a": 1.0}}, "cannot take 'activation_scheme'='static'"),
        ({"towers": "int8"}, "'towers' must be one of ['bf16', 'fp8']"),
        ({"granularity": "per_channel"}, "'granularity' must be one of ['per_row', 'per_tensor']"),
        ({"conditioning": "int4"}, "'conditioning' must be one of ['weight_only', 'fp8', 'bf16']"),
        ({"fast_accum": "yes"}, "'fast_accum' must be True or False"),
        ({"cudagraphs": 1}, "'cudagraphs' must be True or False"),
        ({"strict": "no"}, "'strict' must be True or False"),
        ({"lowering": "int8"}, "'lowering' must be one of ['auto', 'w8a8', 'weight_only']"),
        ({"lowering": "weight_only", "weight_block_size": [128, 128]}, "'lowering'='weight_only' does not apply to 'weight_block_size'"),
        ("img_mlp", "omni_fp8 options must be a dict"),
    ],
)
def test_bad_options_name_the_key_and_the_choices(options, message):
    with pytest.raises(ValueError) as info:
        Fp8Config.from_options(options)
    assert message in str(info.value)


def test_cudagraphs_option_and_cpu_settings_reach_inductor():
    from fp8_compile.inductor import config_patches

    assert config_patches(torch.device("cuda"), None, cudagraphs=True)["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in config_patches(torch.device("cuda"), None, cudagraphs=False)
    assert config_patches(torch.device("cpu"), None, cudagraphs=False)["cpp.simdlen"] == 256
