import pytest

from fp8_compile import Fp8Config


def test_defaults():
    config = Fp8Config.from_options(None)
    assert config.method == "fp8"
    assert config.ignored_layers == ()
    assert config.activation_scheme == "dynamic"
    assert config.weight_block_size is None
    assert config.granularity == "per_row"


def test_single_pattern_string_is_one_pattern():
    assert Fp8Config.from_options({"ignored_layers": "img_mlp"}).ignored_layers == ("img_mlp",)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ignored_layer": ["x"]}, "unknown omni_fp8 option 'ignored_layer' (did you mean 'ignored_layers'?)"),
        ({"method": "int8"}, "'method' must be one of ['fp8']"),
        ({"ignored_layers": 3}, "'ignored_layers' must be a list of non-empty layer-name patterns"),
        ({"ignored_layers": ["ok", ""]}, "'ignored_layers' must be a list of non-empty layer-name patterns"),
        ({"ignored_layers": ["re:("]}, "'re:(' is not a valid regular expression"),
        ({"activation_scheme": "dynamik"}, "did you mean 'dynamic'"),
        ({"activation_scheme": "static"}, "'activation_scheme'='static' needs calibrated activation scales"),
        ({"weight_block_size": [128, 128]}, "'weight_block_size' (block-wise weight scales) is not supported yet"),
        ({"granularity": "per_channel"}, "'granularity' must be one of ['per_row', 'per_tensor']"),
        ({"conditioning": "int4"}, "'conditioning' must be one of ['weight_only', 'fp8', 'bf16']"),
        ({"fast_accum": "yes"}, "'fast_accum' must be True or False"),
        ("img_mlp", "omni_fp8 options must be a dict"),
    ],
)
def test_bad_options_name_the_key_and_the_choices(options, message):
    with pytest.raises(ValueError) as info:
        Fp8Config.from_options(options)
    assert message in str(info.value)
