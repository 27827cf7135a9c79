"""Error measures of an FP8 tensor against its BF16 reference.

SQNR (signal-to-quantization-noise ratio) is ``10 log10(sum(ref^2) / sum((test - ref)^2))`` in dB;
the relative error ``||test - ref|| / ||ref||`` is the same quantity on a linear scale
(``SQNR = -20 log10(relative error)``). One e4m3 rounding has a relative error of up to 2**-4,
about 2**-4 / sqrt(3) RMS, i.e. an SQNR near 29 dB; an FP8 GEMM, which rounds both operands,
lands near 25-28 dB on random data. PSNR and SSIM of images come from torchmetrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ErrorSums:
    """Running sums over any number of (reference, test) pairs, so that a layer called several
    times in one forward pass gets one figure over all its calls."""

    signal: float = 0.0  # sum of ref^2
    noise: float = 0.0  # sum of (test - ref)^2
    dot: float = 0.0  # sum of ref * test
    test_energy: float = 0.0  # sum of test^2

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> ErrorSums:
        if reference.shape != test.shape:
            raise ValueError(f"cannot compare tensors of shapes {list(reference.shape)} and {list(test.shape)}")
        ref, out = reference.double(), test.double()
        self.signal += ref.square().sum().item()
        self.noise += (out - ref).square().sum().item()
        self.dot += (ref * out).sum().item()
        self.test_energy += out.square().sum().item()
        return self

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    @property
    def relative_error(self) -> float:
        if self.signal == 0:
            return 0.0 if self.noise == 0 else math.inf
        return math.sqrt(self.noise / self.signal)

    @property
    def cosine(self) -> float:
        norms = math.sqrt(self.signal * self.test_energy)
        return self.dot / norms if norms else (1.0 if self.noise == 0 else 0.0)


def compare(reference: torch.Tensor, test: torch.Tensor) -> ErrorSums:
    return ErrorSums().add(reference, test)


def data_range_of(images: torch.Tensor) -> float:
    """The value range of a batch of images, for PSNR and SSIM of images that have no fixed range
    (latents); never 0."""
    span = (images.max() - images.min()).item()
    return span if span > 0 else 1.0


def psnr_db(reference: torch.Tensor, test: torch.Tensor, data_range: float) -> float:
    """PSNR of a batch of images [B, C, H, W] against the reference batch, over all pixels."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(test.double(), reference.double(), data_range=data_range).item()


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float) -> float:
    """Mean SSIM over a batch of images [B, C, H, W] with a uniform 7x7 window (scikit-image's
    default), or the largest odd window that fits images smaller than 7 pixels."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(reference.shape[-2:])
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {reference.shape[-2]}x{reference.shape[-1]}")
    return structural_similarity_index_measure(
        test.double(), reference.double(), gaussian_kernel=False, kernel_size=window, data_range=data_range
    ).item()
