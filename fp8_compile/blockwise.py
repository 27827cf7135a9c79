"""Block-wise FP8: weights scaled per [block_n x block_k] block, activations per (1 x block_k) group.

This is the scaling of block-FP8 checkpoints (DeepSeek-V3, Qwen3-FP8: ``weight_block_size``
[128, 128], ``weight_scale_inv`` of shape [ceil(N/128), ceil(K/128)]): each block of the weight
and each group of ``block_k`` consecutive activation values of a token has its own scale, so an
outlier costs precision only inside its block. The product of a K-block is scaled by its
activation group's and its weight block's scales before it is added to the sum.

On an NVIDIA GPU the GEMM is the Triton kernel of :mod:`fp8_compile.triton_blockwise` (FP8 tensor
cores on SM89+); elsewhere :func:`block_scaled_mm` computes the same product from its definition
(the reference the kernel is tested against). Shapes that do not divide by the block are padded
with zeros for the scale computation; the last block of a row or column is then partial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8_compile.config import Fp8Config
from fp8_compile.modules import ScaledLinear
from fp8_compile.ops import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, weight_row_chunks
from fp8_compile.report import Decision

if TYPE_CHECKING:
    from fp8_compile.convert import LayerPlan


def num_blocks(size: int, block: int) -> int:
    return -(-size // block)


def describe_blocks(plans: list[LayerPlan], config: Fp8Config) -> None:
    """Name the block size, and partial edge blocks, in the report reason of each block-FP8 layer."""
    if config.weight_block_size is None:
        return
    bn, bk = config.weight_block_size
    for plan in plans:
        if plan.decision is Decision.FP8:
            n, k = plan.module.out_features, plan.module.in_features
            partial = f", partial edge blocks (N={n}, K={k})" if n % bn or k % bk else ""
            plan.reason = f"block {bn}x{bk}{partial}"


def quantize_weight_blocks(weight: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (FP8 weight [N, K], float32 scales [ceil(N/bn), ceil(K/bk)]).

    Works through whole rows of blocks, about WEIGHT_CHUNK_ELEMENTS at a time (see
    ``ops.quantize_weight``). Raises ValueError on a non-finite weight, which no scale can represent.
    """
    bn, bk = block_size
    n, k = weight.shape
    quantized = torch.empty((n, k), dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty((num_blocks(n, bn), num_blocks(k, bk)), dtype=torch.float32, device=weight.device)
    for rows in weight_row_chunks(n, scale.shape[1] * bk, multiple=bn):
        block_rows = slice(rows.start // bn, num_blocks(rows.stop, bn))
        quantized[rows], scale[block_rows] = _quantize_block_rows(weight.detach()[rows], block_size)
    return quantized, scale


def _quantize_block_rows(rows: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of :func:`quantize_weight_blocks`: [n, K] rows -> (FP8 [n, K], [ceil(n/bn), ceil(K/bk)])."""
    bn, bk = block_size
    n, k = rows.shape
    nb, kb = num_blocks(n, bn), num_blocks(k, bk)
    blocks = F.pad(rows.float(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)  # a copy
    amax = blocks.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("weight contains Inf or NaN")
    scale = amax.clamp_min(AMAX_FLOOR) / FP8_MAX
    quantized = blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.view(nb * bn, kb * bk)[:n, :k], scale


def quantize_activation_groups(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scaling of a [M, K] activation per (1 x block_k) group: (FP8 [M, K], float32 [M, ceil(K/bk)]).

    The FP8 tensor is a view of a [M, ceil(K/bk) * bk] buffer when K does not divide by the
    group (its rows then have that stride). A NaN or Inf poisons its group's scale, and through
    it the output row, as with the other activation scalings.
    """
    m, k = x.shape
    kb = num_blocks(k, block_k)
    groups = F.pad(x.float(), (0, kb * block_k - k)).view(m, kb, block_k)
    scale = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    quantized = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.view(m, kb * block_k)[:, :k], scale


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(R/br), ceil(C/bc)] repeated to one scale per element of a [R, C] tensor."""
    rows, cols = shape
    return scale.repeat_interleave(block_size[0], 0).repeat_interleave(block_size[1], 1)[:rows, :cols]


def block_scaled_mm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: tuple[int, int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[M, K] x [N, K]^T with per-group activation scales and per-block weight scales, plus bias."""
    if x_fp8.is_cuda:
        from fp8_compile.triton_blockwise import block_fp8_mm

        return block_fp8_mm(x_fp8, x_scale, weight_fp8, weight_scale, bias, block_size[0], block_size[1], out_dtype)
    x = x_fp8.float() * expand_block_scales(x_scale, tuple(x_fp8.shape), (1, block_size[1]))
    w = weight_fp8.float() * expand_block_scales(weight_scale, tuple(weight_fp8.shape), block_size)
    return F.linear(x, w, bias.float() if bias is not None else None).to(out_dtype)


def block_fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    """``F.linear`` with a block-scaled FP8 weight and a group-scaled FP8 activation."""
    x_fp8, x_scale = quantize_activation_groups(x.reshape(-1, x.shape[-1]), block_k)
    out = block_scaled_mm(x_fp8, x_scale, weight_fp8, weight_scale, bias, (block_n, block_k), x.dtype)
    return out.reshape(*x.shape[:-1], weight_fp8.shape[0])


@torch.library.custom_op("fp8_compile::block_scaled_linear", mutates_args=())
def block_scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    return block_fp8_linear(x, weight, weight_scale, bias, block_n, block_k)


@block_scaled_linear.register_fake
def _(x, weight, weight_scale, bias, block_n, block_k):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class BlockScaledLinear(ScaledLinear):
    """A :class:`ScaledLinear` whose FP8 weight has one float32 scale per ``block_size`` block.

    ``weight_scale`` is [ceil(N/block_n), ceil(K/block_k)] (a block-FP8 checkpoint's
    ``weight_scale_inv``); the activation is quantized per (1 x block_k) group on the fly.
    """

    block_size: tuple[int, int]

    @classmethod
    def convert(cls, linear: nn.Linear, *, block_size: tuple[int, int]) -> BlockScaledLinear:
        """Quantize ``linear``'s weight per block and turn the module into a BlockScaledLinear, in place."""
        weight_fp8, scale = quantize_weight_blocks(linear.weight, block_size)
        return cls.from_blocks(linear, weight_fp8, scale, block_size)

    @classmethod
    def from_blocks(
        cls, linear: nn.Linear, weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int]
    ) -> BlockScaledLinear:
        """Turn ``linear`` into a BlockScaledLinear holding already quantized tensors, in place."""
        module = cls.from_quantized(
            linear, weight, weight_scale, None, quantize_input=True, granularity="block", fast_accum=False
        )
        module.block_size = (int(block_size[0]), int(block_size[1]))
        return module

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.check_input(x)
        return torch.ops.fp8_compile.block_scaled_linear.default(x, self.weight, self.weight_scale, bias, *self.block_size)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, fp8=w8a8, block_size={list(self.block_size)}"
