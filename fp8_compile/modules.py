"""``ScaledLinear``: an ``nn.Linear`` whose weight is stored in FP8 with a float32 scale."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from fp8_compile import ops


class ScaledLinear(nn.Linear):
    """A linear layer with an FP8 (e4m3) ``weight`` and a float32 ``weight_scale``.

    Made in place from an ``nn.Linear`` by :meth:`convert`, so the module keeps its identity, its
    name, its hooks and its bias. ``quantize_input`` selects W8A8 (the activation is quantized
    on the fly) or weight-only FP8 (the activation stays in its dtype).

    The FP8 weight is a buffer, not a parameter: diffusers and transformers take a model's
    compute dtype from its first floating-point parameter (``model.dtype``, which pipelines use
    to cast latents), and an FP8 parameter there would make them cast activations to FP8.
    Run eagerly it calls the ``fp8_compile::`` custom ops; under ``torch.compile(backend=
    "omni_fp8")`` the graph passes replace those calls with fused kernels.
    """

    weight_scale: torch.Tensor
    quantize_input: bool
    granularity: str
    fast_accum: bool

    @classmethod
    def convert(cls, linear: nn.Linear, *, quantize_input: bool, granularity: str, fast_accum: bool) -> ScaledLinear:
        """Quantize ``linear``'s weight and turn the module into a ScaledLinear, in place.

        The BF16 weight is released as soon as the FP8 copy exists. Weight-only layers always use
        one scale per output channel: their GEMM takes any scale shape, and it halves the error.
        """
        weight_granularity = granularity if quantize_input else "per_row"
        weight_fp8, scale = ops.quantize_weight(linear.weight, weight_granularity)
        del linear.weight
        linear.register_buffer("weight", weight_fp8)
        linear.register_buffer("weight_scale", scale)
        linear.__class__ = cls
        linear.quantize_input = quantize_input
        linear.granularity = weight_granularity
        linear.fast_accum = fast_accum
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's FP8 product with ``x``, plus ``bias``."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "fp8_compile layers are inference-only (FP8 GEMMs have no backward here); "
                "run the model under torch.no_grad() or torch.inference_mode()"
            )
        if x.dtype == self.weight.dtype:
            raise RuntimeError(
                "an FP8 layer received an FP8 input: the model code cast it to the layer's weight "
                "dtype; keep this layer in BF16 with options={'ignored_layers': [<its name>]}"
            )
        if self.quantize_input:
            return torch.ops.fp8_compile.scaled_linear.default(
                x, self.weight, self.weight_scale, bias, self.granularity, self.fast_accum
            )
        return torch.ops.fp8_compile.weight_only_scaled_linear.default(x, self.weight, self.weight_scale, bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ScaledLinear:
        # model.to(torch.bfloat16), .half() or .float() cast every floating-point tensor, FP8 ones
        # included, which would silently drop the quantization. The FP8 weight and its scale
        # follow device moves only.
        keep_dtype = {id(self.weight): self.weight.dtype, id(self.weight_scale): self.weight_scale.dtype}

        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if id(t) in keep_dtype and moved.dtype != keep_dtype[id(t)]:
                moved = t.to(device=moved.device)
            return moved

        return super()._apply(move_only, recurse)

    def extra_repr(self) -> str:
        mode = "w8a8" if self.quantize_input else "weight-only"
        return f"{super().extra_repr()}, fp8={mode}, granularity={self.granularity}"
