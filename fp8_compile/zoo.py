"""The denoisers in scope, each with a tiny config (tests, demo), its full-size config
(benchmarks, random weights) and a function that builds a forward call's inputs.

Tiny configs keep every attention and MLP width a multiple of 16 and >= 64, so their linears
take the FP8 GEMM path and their FP8 weights are close to half their BF16 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Resolution:
    """What a forward call covers: an image (frames=1) or a video, plus the text length."""

    height: int  # in pixels, as the pipeline sees them (the VAE downsamples by 8 or 16)
    width: int
    frames: int = 1
    text_tokens: int = 16
    batch: int = 1


@dataclass(frozen=True)
class DiTSpec:
    name: str
    class_name: str  # diffusers class
    tiny: dict[str, Any]
    full: dict[str, Any]
    make_inputs: Callable[[nn.Module, Resolution, torch.dtype, torch.device], dict[str, Any]]

    def build(
        self, size: str = "tiny", dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", **overrides
    ) -> nn.Module:
        """The model of ``size`` ("tiny" or "full"), with ``overrides`` replacing config entries."""
        import diffusers

        if size not in ("tiny", "full"):
            raise ValueError(f"model size must be 'tiny' or 'full', got {size!r}")
        cls = getattr(diffusers, self.class_name)
        config = {**(self.tiny if size == "tiny" else self.full), **overrides}
        # Built in its dtype: a full-size model never exists in float32 (Qwen-Image's 20B
        # parameters would take 82 GB), and construction is twice as fast.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = cls(**config)
        finally:
            torch.set_default_dtype(default_dtype)
        # Then every tensor created in float32 on purpose is cast too, as a random-weight model
        # should be. nn.Module.to, because diffusers' own .to() warns about float32-kept modules
        # on every dtype cast (even with none listed).
        return nn.Module.to(model, dtype).eval()

    def inputs(self, model: nn.Module, resolution: Resolution, dtype=torch.bfloat16, device="cpu") -> dict[str, Any]:
        return self.make_inputs(model, resolution, dtype, torch.device(device))


def first_output(out) -> torch.Tensor:
    """The denoised sample of a DiT forward, in float32, however the class returns it
    (a tuple or an output object; Z-Image returns one tensor per sample in a list)."""
    out = out[0] if isinstance(out, (tuple, list)) else out.sample
    return (out[0] if isinstance(out, list) else out).float()


def _latent_hw(res: Resolution, scale: int = 8) -> tuple[int, int]:
    return res.height // scale, res.width // scale


def _flux_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 16)  # 8x VAE, then 2x2 packing
    n, length, b = h * w, res.text_tokens, res.batch
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    return dict(
        hidden_states=torch.randn(b, n, cfg.in_channels, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(b, length, cfg.joint_attention_dim, dtype=dtype, device=device),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, dtype=dtype, device=device),
        timestep=torch.full((b,), 0.5, device=device),
        img_ids=img_ids.reshape(n, 3),
        txt_ids=torch.zeros(length, 3, device=device),
        guidance=torch.full((b,), 3.5, device=device) if cfg.guidance_embeds else None,
        return_dict=False,
    )


def _flux2_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 16)
    n, length, b = h * w, res.text_tokens, res.batch
    img_ids = torch.zeros(b, h, w, 4, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    txt_ids = torch.zeros(b, length, 4, device=device)
    txt_ids[..., 3] = torch.arange(length, device=device)
    return dict(
        hidden_states=torch.randn(b, n, cfg.in_channels, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(b, length, cfg.joint_attention_dim, dtype=dtype, device=device),
        timestep=torch.full((b,), 0.5, device=device),
        img_ids=img_ids.reshape(b, n, 4),
        txt_ids=txt_ids,
        guidance=torch.full((b,), 3.5, device=device) if cfg.guidance_embeds else None,
        return_dict=False,
    )


def _qwen_image_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 16)
    length, b = res.text_tokens, res.batch
    return dict(
        hidden_states=torch.randn(b, h * w, cfg.in_channels, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(b, length, cfg.joint_attention_dim, dtype=dtype, device=device),
        encoder_hidden_states_mask=torch.ones(b, length, dtype=torch.long, device=device),
        timestep=torch.full((b,), 0.5, dtype=dtype, device=device),
        img_shapes=[[(1, h, w)]] * b,
        return_dict=False,
    )


def _wan_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 8)
    frames = (res.frames - 1) // 4 + 1  # the Wan VAE compresses time 4x
    return dict(
        hidden_states=torch.randn(res.batch, cfg.in_channels, frames, h, w, dtype=dtype, device=device),
        timestep=torch.full((res.batch,), 500.0, device=device),
        encoder_hidden_states=torch.randn(res.batch, res.text_tokens, cfg.text_dim, dtype=dtype, device=device),
        return_dict=False,
    )


def _z_image_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 8)
    return dict(
        x=[torch.randn(cfg.in_channels, 1, h, w, dtype=dtype, device=device) for _ in range(res.batch)],
        t=torch.full((res.batch,), 0.5, dtype=dtype, device=device),
        cap_feats=[torch.randn(res.text_tokens, cfg.cap_feat_dim, dtype=dtype, device=device) for _ in range(res.batch)],
        return_dict=False,
    )


def _hunyuan_video15_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 16)
    frames = (res.frames - 1) // 4 + 1
    b, length = res.batch, res.text_tokens
    return dict(
        hidden_states=torch.randn(b, cfg.in_channels, frames, h, w, dtype=dtype, device=device),
        timestep=torch.full((b,), 500.0, dtype=dtype, device=device),  # its time embedder runs in this dtype
        encoder_hidden_states=torch.randn(b, length, cfg.text_embed_dim, dtype=dtype, device=device),
        encoder_attention_mask=torch.ones(b, length, device=device),
        encoder_hidden_states_2=torch.randn(b, length, cfg.text_embed_2_dim, dtype=dtype, device=device),
        encoder_attention_mask_2=torch.ones(b, length, device=device),
        image_embeds=torch.zeros(b, 8, cfg.image_embed_dim, dtype=dtype, device=device),
        return_dict=False,
    )


def _glm_image_inputs(model, res, dtype, device):
    cfg = model.config
    h, w = _latent_hw(res, 8)
    b, tokens = res.batch, (h // cfg.patch_size) * (w // cfg.patch_size)
    return dict(
        hidden_states=torch.randn(b, cfg.in_channels, h, w, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(b, res.text_tokens, cfg.text_embed_dim, dtype=dtype, device=device),
        prior_token_id=torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (b, tokens), device=device),
        prior_token_drop=torch.zeros(b, tokens, dtype=torch.bool, device=device),
        timestep=torch.full((b,), 500.0, device=device),
        target_size=torch.tensor([[res.height, res.width]] * b, dtype=dtype, device=device),
        crop_coords=torch.zeros(b, 2, dtype=dtype, device=device),
        return_dict=False,
    )


DITS: dict[str, DiTSpec] = {
    spec.name: spec
    for spec in [
        DiTSpec(
            "flux",
            "FluxTransformer2DModel",
            tiny=dict(
                patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                axes_dims_rope=(8, 12, 12),
            ),
            full=dict(guidance_embeds=True),
            make_inputs=_flux_inputs,
        ),
        DiTSpec(
            "flux2_klein",
            "Flux2Transformer2DModel",
            tiny=dict(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=64, timestep_guidance_channels=64,
                axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False,
            ),
            full=dict(
                in_channels=128, num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
                joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                timestep_guidance_channels=256, guidance_embeds=False,
            ),
            make_inputs=_flux2_inputs,
        ),
        DiTSpec(
            "qwen_image",
            "QwenImageTransformer2DModel",
            tiny=dict(
                patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12),
            ),
            full=dict(
                patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
            ),
            make_inputs=_qwen_image_inputs,
        ),
        DiTSpec(
            "wan",
            "WanTransformer3DModel",
            tiny=dict(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                text_dim=64, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
            ),
            full=dict(
                patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, eps=1e-6,
                rope_max_seq_len=1024,
            ),
            make_inputs=_wan_inputs,
        ),
        DiTSpec(
            "z_image",
            "ZImageTransformer2DModel",
            tiny=dict(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=96, n_layers=2, n_refiner_layers=1,
                n_heads=3, n_kv_heads=3, cap_feat_dim=64, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32],
            ),
            full=dict(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48],
                axes_lens=[1536, 512, 512],
            ),
            make_inputs=_z_image_inputs,
        ),
        DiTSpec(
            "hunyuan_video15",
            "HunyuanVideo15Transformer3DModel",
            tiny=dict(
                in_channels=9, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                num_refiner_layers=1, text_embed_dim=64, text_embed_2_dim=64, image_embed_dim=64,
                rope_axes_dim=(8, 12, 12), target_size=64, task_type="t2v",
            ),
            full=dict(
                in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=3584, text_embed_2_dim=1472,
                image_embed_dim=1152, rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v",
            ),
            make_inputs=_hunyuan_video15_inputs,
        ),
        DiTSpec(
            "glm_image",
            "GlmImageTransformer2DModel",
            tiny=dict(
                patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, text_embed_dim=64, time_embed_dim=64, condition_dim=16,
                prior_vq_quantizer_codebook_size=64,
            ),
            full={},
            make_inputs=_glm_image_inputs,
        ),
    ]
}
