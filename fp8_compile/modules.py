"""``ScaledLinear``: an ``nn.Linear`` whose weight is stored in FP8 with a float32 scale."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from fp8_compile import ops


def moving_only(
    fn: Callable[[torch.Tensor], torch.Tensor], kept: list[torch.Tensor | None]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (as ``nn.Module._apply`` calls it) applying only device moves to the ``kept`` tensors."""
    keep_dtype = {id(t): t.dtype for t in kept if t is not None}

    def move_only(t: torch.Tensor) -> torch.Tensor:
        moved = fn(t)
        if id(t) in keep_dtype and moved.dtype != keep_dtype[id(t)]:
            moved = t.to(device=moved.device)
        return moved

    return move_only


class ScaledLinear(nn.Linear):
    """A linear layer with an FP8 (e4m3) ``weight`` and a float32 ``weight_scale``.

    Made in place from an ``nn.Linear`` by :meth:`convert`, so the module keeps its identity, its
    name, its hooks and its bias. ``quantize_input`` selects W8A8 (the activation is quantized
    on the fly) or weight-only FP8 (the activation stays in its dtype). A float32
    ``input_scale`` (static activation scaling, from a calibration or a checkpoint) replaces the
    on-the-fly activation scale; it is None for dynamic scaling.

    The FP8 weight is a buffer, not a parameter: diffusers and transformers take a model's
    compute dtype from its first floating-point parameter (``model.dtype``, which pipelines use
    to cast latents), and an FP8 parameter there would make them cast activations to FP8.
    Run eagerly it calls the ``fp8_compile::`` custom ops; under ``torch.compile(backend=
    "omni_fp8")`` the graph passes replace those calls with fused kernels.
    """

    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    quantize_input: bool
    granularity: str
    fast_accum: bool

    @classmethod
    def convert(
        cls,
        linear: nn.Linear,
        *,
        quantize_input: bool,
        granularity: str,
        fast_accum: bool,
        input_scale: float | None = None,
    ) -> ScaledLinear:
        """Quantize ``linear``'s weight and turn the module into a ScaledLinear, in place.

        The BF16 weight is released as soon as the FP8 copy exists. Weight-only layers always use
        one scale per output channel: their GEMM takes any scale shape, and it halves the error.
        """
        weight_granularity = granularity if quantize_input else "per_row"
        weight_fp8, scale = ops.quantize_weight(linear.weight, weight_granularity)
        static_scale = None if input_scale is None else torch.tensor(input_scale, dtype=torch.float32, device=scale.device)
        return cls.from_quantized(
            linear, weight_fp8, scale, static_scale,
            quantize_input=quantize_input, granularity=weight_granularity, fast_accum=fast_accum,
        )

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Linear,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None,
        *,
        quantize_input: bool,
        granularity: str,
        fast_accum: bool,
    ) -> ScaledLinear:
        """Turn ``linear`` into a ScaledLinear holding already quantized tensors, in place.

        What :meth:`convert` ends with, and how an FP8 checkpoint is loaded: ``linear``'s own
        weight (BF16, or a meta-device placeholder) is dropped, never cast.
        """
        del linear.weight
        linear.register_buffer("weight", weight)
        linear.register_buffer("weight_scale", weight_scale)
        linear.register_buffer("input_scale", input_scale)
        linear.__class__ = cls
        linear.quantize_input = quantize_input
        linear.granularity = granularity
        linear.fast_accum = fast_accum
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's FP8 product with ``x``, plus ``bias``."""
        self.check_input(x)
        if self.quantize_input and self.input_scale is not None:
            return torch.ops.fp8_compile.scaled_linear.default(
                x, self.weight, self.weight_scale, bias, self.granularity, self.fast_accum, input_scale=self.input_scale
            )
        if self.quantize_input:
            return torch.ops.fp8_compile.scaled_linear.default(
                x, self.weight, self.weight_scale, bias, self.granularity, self.fast_accum
            )
        return torch.ops.fp8_compile.weight_only_scaled_linear.default(x, self.weight, self.weight_scale, bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse what an FP8 layer cannot compute: gradients, and an input already cast to FP8."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "fp8_compile layers are inference-only (FP8 GEMMs have no backward here); "
                "run the model under torch.no_grad() or torch.inference_mode()"
            )
        if x.dtype == self.weight.dtype:
            # The module does not know its own name; its shape and mode narrow it down.
            raise RuntimeError(
                f"an FP8 layer ({self.extra_repr()}) received an FP8 input: the model code cast it to the "
                "layer's weight dtype; keep this layer in BF16 with options={'ignored_layers': [<its name>]}"
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ScaledLinear:
        # model.to(torch.bfloat16), .half() or .float() cast every floating-point tensor, FP8 ones
        # included, which would silently drop the quantization. The FP8 weight and its scales
        # follow device moves only.
        return super()._apply(moving_only(fn, [self.weight, self.weight_scale, self.input_scale]), recurse)

    def extra_repr(self) -> str:
        mode = ("w8a8 static" if self.input_scale is not None else "w8a8") if self.quantize_input else "weight-only"
        return f"{super().extra_repr()}, fp8={mode}, granularity={self.granularity}"
