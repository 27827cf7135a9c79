"""Small, complete diffusers pipelines with random weights and locally built tokenizers.

    python -m fp8_compile.tiny_pipelines --kind flux --out /tmp/tiny-flux

writes a pipeline folder that ``DiffusionPipeline.from_pretrained(folder)`` loads like a real
checkpoint: the real diffusers and transformers classes, with the tiny denoiser configs of
:mod:`fp8_compile.zoo`, tiny text encoders whose width matches them, tiny VAEs and tokenizers
built here from a fixed vocabulary (nothing is downloaded). The images they produce are noise,
but every stage of a real generation runs: tokenizer, text encoder(s), denoiser(s) over the
scheduler's steps, VAE decode. The tests, ``examples/text_to_image.py`` and its built-in
default use them.
"""

from __future__ import annotations

import argparse
import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fp8_compile.zoo import DITS

logger = logging.getLogger("fp8_compile")

# Tokenizers. Byte-level BPE (CLIP, Qwen) with no merges covers any text byte by byte, and the
# T5/UMT5 Unigram vocabulary covers printable ASCII character by character: every prompt
# tokenizes, and the vocabularies stay a few hundred entries.
_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's chat format, which Z-Image's pipeline applies to each prompt before tokenizing it.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CLIP_CONTEXT = 77  # CLIP's text length (its tokenizer's model_max_length)
_WIDTH = 64  # the text width (joint_attention_dim, text_dim, cap_feat_dim) of zoo's tiny denoisers


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _padded_vocab_size(n: int) -> int:
    # A multiple of 64, so that an lm_head (Qwen2.5-VL) is a valid FP8 GEMM shape (N % 16 == 0).
    return -(-n // 64) * 64


def clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = _byte_alphabet()
    pieces = specials + alphabet + [c + "</w>" for c in alphabet]
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=_CLIP_CONTEXT)


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    from transformers import AddedToken, Qwen2Tokenizer

    pieces = _QWEN_SPECIAL_TOKENS + _byte_alphabet()
    tokenizer = Qwen2Tokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=2048)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in _QWEN_SPECIAL_TOKENS])
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


# Text encoders, as wide as the tiny denoisers' text input (_WIDTH), two layers each.


def clip_text_encoder(tokenizer) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_padded_vocab_size(len(tokenizer)), hidden_size=_WIDTH, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=_CLIP_CONTEXT, projection_dim=_WIDTH,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )


def _t5_config(tokenizer, config_class):
    return config_class(
        vocab_size=_padded_vocab_size(len(tokenizer)), d_model=_WIDTH, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )


def t5_text_encoder(tokenizer) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(_t5_config(tokenizer, T5Config))


def umt5_text_encoder(tokenizer) -> nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(_t5_config(tokenizer, UMT5Config))


def qwen3_text_encoder(tokenizer) -> nn.Module:
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(
        Qwen3Config(
            vocab_size=_padded_vocab_size(len(tokenizer)), hidden_size=_WIDTH, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        )
    )


def qwen2_5_vl_text_encoder(tokenizer) -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=_padded_vocab_size(len(tokenizer)), hidden_size=_WIDTH, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6]},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=_WIDTH, fullatt_block_indexes=[0], window_size=16,
    )
    # The vision tower is never run for text-to-image; these ids only need to lie outside the vocabulary.
    ids = dict(image_token_id=10**6, video_token_id=10**6 + 1, vision_start_token_id=10**6 + 2, vision_end_token_id=10**6 + 3)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


# VAEs: few channels, one block per level, the real spatial compression (8x).


def _image_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )


def _wan_style_vae(class_name: str) -> nn.Module:
    import diffusers

    return getattr(diffusers, class_name)(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _denoiser(name: str, seed: int, **overrides: Any) -> nn.Module:
    """zoo's tiny denoiser ``name``, with ``overrides`` on top of its tiny config."""
    import diffusers

    spec = DITS[name]
    torch.manual_seed(seed)
    return getattr(diffusers, spec.class_name)(**{**spec.tiny, **overrides})


@dataclass(frozen=True)
class TinyPipelineSpec:
    """How to build one small pipeline, and the output size its tests and demos use."""

    kind: str
    pipeline_class: str
    build_components: Callable[[int], dict[str, Any]]  # seed -> the pipeline's components
    height: int
    width: int
    num_frames: int | None = None  # video pipelines only
    text_encoders: tuple[str, ...] = ("text_encoder",)
    denoisers: tuple[str, ...] = ("transformer",)


def _flux_components(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    return dict(
        tokenizer=clip, text_encoder=clip_text_encoder(clip), tokenizer_2=t5, text_encoder_2=t5_text_encoder(t5),
        vae=_image_vae(), transformer=_denoiser("flux", seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    )


def _qwen_image_components(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    return dict(
        tokenizer=tokenizer, text_encoder=qwen2_5_vl_text_encoder(tokenizer), vae=_wan_style_vae("AutoencoderKLQwenImage"),
        transformer=_denoiser("qwen_image", seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, shift_terminal=0.02),
    )


def _z_image_components(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    return dict(
        tokenizer=tokenizer, text_encoder=qwen3_text_encoder(tokenizer), vae=_image_vae(),
        # Rotary tables long enough for the caption positions of a chat-formatted prompt.
        transformer=_denoiser("z_image", seed + 1, axes_lens=[1024, 64, 64]), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _wan_components(seed: int) -> dict[str, Any]:
    from diffusers import UniPCMultistepScheduler

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    return dict(
        tokenizer=tokenizer, text_encoder=umt5_text_encoder(tokenizer), vae=_wan_style_vae("AutoencoderKLWan"),
        # Wan2.2 A14B: a high-noise expert for timesteps above boundary_ratio * 1000, a low-noise one below.
        transformer=_denoiser("wan", seed + 1), transformer_2=_denoiser("wan", seed + 2), boundary_ratio=0.875,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )


PIPELINES: dict[str, TinyPipelineSpec] = {
    spec.kind: spec
    for spec in [
        TinyPipelineSpec("flux", "FluxPipeline", _flux_components, 128, 128, text_encoders=("text_encoder", "text_encoder_2")),
        TinyPipelineSpec("qwen_image", "QwenImagePipeline", _qwen_image_components, 128, 128),
        TinyPipelineSpec("z_image", "ZImagePipeline", _z_image_components, 128, 128),
        TinyPipelineSpec("wan", "WanPipeline", _wan_components, 64, 64, num_frames=5, denoisers=("transformer", "transformer_2")),
    ]
}


def build_tiny_pipeline(kind: str, seed: int = 0):
    """The pipeline of architecture ``kind`` (a key of :data:`PIPELINES`), in BF16, in memory."""
    import diffusers

    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {sorted(PIPELINES)}")
    spec = PIPELINES[kind]
    pipeline = getattr(diffusers, spec.pipeline_class)(**spec.build_components(seed))
    return pipeline.to(torch.bfloat16)


def write_tiny_pipeline(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the pipeline of architecture ``kind`` and save it to ``out_dir`` (a diffusers folder)."""
    out = Path(out_dir)
    build_tiny_pipeline(kind, seed).save_pretrained(out)
    logger.info("wrote a tiny %s to %s", PIPELINES[kind].pipeline_class, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=sorted(PIPELINES), help="pipeline architecture")
    parser.add_argument("--out", required=True, help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_pipeline(args.kind, args.out, args.seed)


if __name__ == "__main__":
    main()
