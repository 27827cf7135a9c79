"""What TeaCache needs to know about each denoiser in scope: its block stack, how its blocks take
and return their streams, the signal compared between steps, and the rescaling polynomial.

TeaCache: Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
CVPR 2025 (arXiv:2411.19108); the authors' code and coefficient tables are in
https://github.com/ali-vilab/TeaCache (TeaCache4FLUX/teacache_flux.py,
TeaCache4HunyuanVideo/teacache_sample_video.py, TeaCache4Wan2.1/teacache_generate.py).

The signal is the timestep-modulated input of the first block of the stack, as in the authors'
code (FLUX: ``transformer_blocks[0].norm1(hidden_states, emb=temb)[0]``); for Wan it is the
projected timestep embedding the blocks receive (the authors' ``e0``, their ``--use_ret_steps``
mode, whose coefficients are the ones used here).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

Arguments = Mapping[str, Any]


@dataclass(frozen=True)
class Coefficients:
    """A polynomial mapping the signal's relative L1 change to the output's (highest degree first)."""

    values: tuple[float, ...]
    source: str
    published: bool  # fit on this very model; False: borrowed from a related model, with a warning


FLUX1 = Coefficients(
    (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    "TeaCache authors, FLUX.1-dev (TeaCache4FLUX/teacache_flux.py)",
    True,
)
HUNYUAN_VIDEO = Coefficients(
    (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
    "TeaCache authors, HunyuanVideo (TeaCache4HunyuanVideo/teacache_sample_video.py)",
    True,
)
WAN21_T2V_1_3B = Coefficients(
    (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "TeaCache authors, Wan2.1 T2V 1.3B, e0 signal (TeaCache4Wan2.1/teacache_generate.py --use_ret_steps)",
    True,
)
WAN21_T2V_14B = Coefficients(
    (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "TeaCache authors, Wan2.1 T2V 14B, e0 signal (TeaCache4Wan2.1/teacache_generate.py --use_ret_steps); "
    "Wan2.2 A14B experts have the same architecture and no table of their own",
    True,
)
QWEN_IMAGE = Coefficients(
    (-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02),
    "community fit for Qwen-Image (ComfyUI-TeaCache, as shipped in vLLM-Omni's TeaCache config)",
    True,
)
# No fit was published for these; the closest published polynomial stands in, with a warning.
FLUX1_AS_DEFAULT = replace(
    FLUX1, source="FLUX.1-dev polynomial as a default (none published for this model)", published=False
)
HUNYUAN_VIDEO_FOR_15 = replace(
    HUNYUAN_VIDEO, source="HunyuanVideo (1.0) polynomial (none published for HunyuanVideo-1.5)", published=False
)
WAN_1_3B_AS_DEFAULT = replace(
    WAN21_T2V_1_3B, source="Wan2.1 T2V 1.3B polynomial (none published for this Wan width)", published=False
)


@dataclass(frozen=True)
class BlockIO:
    """How a block class takes and returns the streams that TeaCache carries past skipped blocks."""

    hidden: str  # argument holding the image (or joint image + text) stream
    encoder: str | None  # argument holding the text stream; None where the block has none
    returns: tuple[str, ...]  # the block's outputs in order, each "hidden" or "encoder"

    def bind(self, block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, defaults included."""
        bound = _signature(type(block)).bind(block, *args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def outputs(self, output: Any) -> tuple[torch.Tensor, ...]:
        return output if isinstance(output, tuple) else (output,)

    def hidden_output(self, output: Any) -> torch.Tensor:
        return self.outputs(output)[self.returns.index("hidden")]


@cache
def _signature(block_class: type) -> inspect.Signature:
    return inspect.signature(block_class.forward)


ENCODER_FIRST = BlockIO("hidden_states", "encoder_hidden_states", ("encoder", "hidden"))
HIDDEN_FIRST = BlockIO("hidden_states", "encoder_hidden_states", ("hidden", "encoder"))
HIDDEN_ONLY = BlockIO("hidden_states", None, ("hidden",))

BLOCK_IO: dict[str, BlockIO] = {
    "FluxTransformerBlock": ENCODER_FIRST,
    "FluxSingleTransformerBlock": ENCODER_FIRST,
    "Flux2TransformerBlock": ENCODER_FIRST,
    "Flux2SingleTransformerBlock": HIDDEN_ONLY,  # runs on the joint text + image sequence
    "QwenImageTransformerBlock": ENCODER_FIRST,
    "WanTransformerBlock": HIDDEN_ONLY,
    "ZImageTransformerBlock": BlockIO("x", None, ("hidden",)),  # runs on the joint sequence
    "HunyuanVideo15TransformerBlock": HIDDEN_FIRST,
    "GlmImageTransformerBlock": HIDDEN_FIRST,
}


def _ada_layer_norm_zero_input(block: nn.Module, a: Arguments) -> torch.Tensor:
    return block.norm1(a["hidden_states"], emb=a["temb"])[0]


def _glm_image_input(block: nn.Module, a: Arguments) -> torch.Tensor:
    return block.norm1(a["hidden_states"], a["encoder_hidden_states"], a["temb"])[0]


def _flux2_input(block: nn.Module, a: Arguments) -> torch.Tensor:
    shift, scale, _ = Flux2Modulation.split(a["temb_mod_img"], 2)[0]
    return (1 + scale) * block.norm1(a["hidden_states"]) + shift


def _qwen_image_input(block: nn.Module, a: Arguments) -> torch.Tensor:
    img_mod1 = block.img_mod(a["temb"]).chunk(2, dim=-1)[0]
    return block._modulate(block.img_norm1(a["hidden_states"]), img_mod1, a["modulate_index"])[0]


def _wan_input(block: nn.Module, a: Arguments) -> torch.Tensor:
    return a["temb"]


def _z_image_input(block: nn.Module, a: Arguments) -> torch.Tensor:
    # Omni mode passes per-token conditioning instead of one adaln_input; the noisy one modulates the latents.
    adaln = a["adaln_input"] if a["adaln_input"] is not None else a["adaln_noisy"]
    scale_msa = 1.0 + block.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(a["x"]) * scale_msa


def _wan_coefficients(model: nn.Module) -> Coefficients:
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return {1536: WAN21_T2V_1_3B, 5120: WAN21_T2V_14B}.get(width, WAN_1_3B_AS_DEFAULT)


@dataclass(frozen=True)
class TeaCacheModel:
    """TeaCache's view of one denoiser class."""

    stacks: tuple[str, ...]  # the ModuleLists of blocks that a skipped step bypasses, in call order
    modulated_input: Callable[[nn.Module, Arguments], torch.Tensor]  # (first block, its arguments) -> signal
    coefficients: Callable[[nn.Module], Coefficients]
    warmup_steps: int = 1  # steps computed at the start of every generation

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [block for stack in self.stacks for block in getattr(model, stack)]


TEACACHE_MODELS: dict[str, TeaCacheModel] = {
    "FluxTransformer2DModel": TeaCacheModel(
        ("transformer_blocks", "single_transformer_blocks"), _ada_layer_norm_zero_input, lambda _: FLUX1
    ),
    "Flux2Transformer2DModel": TeaCacheModel(
        ("transformer_blocks", "single_transformer_blocks"), _flux2_input, lambda _: FLUX1_AS_DEFAULT
    ),
    "QwenImageTransformer2DModel": TeaCacheModel(("transformer_blocks",), _qwen_image_input, lambda _: QWEN_IMAGE),
    # The authors compute the first 5 steps in the e0 mode ("ret_steps").
    "WanTransformer3DModel": TeaCacheModel(("blocks",), _wan_input, _wan_coefficients, warmup_steps=5),
    "ZImageTransformer2DModel": TeaCacheModel(("layers",), _z_image_input, lambda _: FLUX1_AS_DEFAULT),
    "HunyuanVideo15Transformer3DModel": TeaCacheModel(
        ("transformer_blocks",), _ada_layer_norm_zero_input, lambda _: HUNYUAN_VIDEO_FOR_15
    ),
    "GlmImageTransformer2DModel": TeaCacheModel(("transformer_blocks",), _glm_image_input, lambda _: FLUX1_AS_DEFAULT),
}


def teacache_model_of(model: nn.Module) -> TeaCacheModel:
    """The TeaCache description of ``model``'s class (or of a diffusers class it derives from)."""
    for cls in type(model).__mro__:
        if cls.__name__ in TEACACHE_MODELS:
            return TEACACHE_MODELS[cls.__name__]
    raise ValueError(
        f"TeaCache does not support {type(model).__name__}; supported denoisers: "
        f"{', '.join(sorted(TEACACHE_MODELS))}. diffusers' own caches work on more models: "
        "cache_backend='first_block_cache' or 'mag_cache'"
    )
