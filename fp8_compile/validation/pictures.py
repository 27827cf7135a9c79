"""Image grids as PNG files (Pillow), for sample sheets and BF16-vs-FP8 comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

_PAD = 2  # pixels between tiles
_LABEL_HEIGHT = 12


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] with C = 1 or 3 -> [B, H, W, C] uint8."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {list(images.shape)}")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(rows: Sequence[torch.Tensor], scale: int = 1, labels: Sequence[str] | None = None) -> Image.Image:
    """One row of tiles per tensor of ``rows`` (each [B, C, H, W] in [0, 1], all the same shape),
    each tile enlarged ``scale`` times (nearest neighbour) and each row optionally labelled."""
    tiles = [_to_uint8(row) for row in rows]
    count, height, width, channels = tiles[0].shape
    label_h = _LABEL_HEIGHT if labels else 0
    tile_h, tile_w = height * scale, width * scale
    grid = Image.new(
        "RGB", (count * (tile_w + _PAD) + _PAD, len(tiles) * (tile_h + _PAD + label_h) + _PAD), "white"
    )
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(tiles):
        top = _PAD + r * (tile_h + _PAD + label_h)
        if labels:
            draw.text((_PAD, top), labels[r], fill="black")
        for c, tile in enumerate(row):
            # a 2-D uint8 array becomes a greyscale picture, an [H, W, 3] one an RGB picture
            picture = Image.fromarray(tile.squeeze(-1).numpy() if channels == 1 else tile.numpy())
            picture = picture.resize((tile_w, tile_h), Image.NEAREST).convert("RGB")
            grid.paste(picture, (_PAD + c * (tile_w + _PAD), top + label_h))
    return grid


def save_image_grid(
    rows: Sequence[torch.Tensor], path: str | Path, scale: int = 1, labels: Sequence[str] | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale, labels).save(path)
    return path


DIFF_GAIN = 10  # the difference row shows |FP8 - BF16| ten times enlarged


def _displayable(images: torch.Tensor, low: float, span: float) -> torch.Tensor:
    """The first 3 channels (or the first one) of [B, C, H, W] images, mapped to [0, 1]."""
    images = images[:, :3] if images.shape[1] >= 3 else images[:, :1]
    return ((images.float() - low) / span).clamp(0, 1)


def save_side_by_side(
    reference: torch.Tensor, test: torch.Tensor, path: str | Path, data_range: float, fixed_range: bool
) -> Path:
    """BF16 images, FP8 images and their enlarged difference, one row each. Images without a fixed
    range (latents) are shown over the BF16 images' own range."""
    low = 0.0 if fixed_range else reference.min().item()
    rows = [
        _displayable(reference, low, data_range),
        _displayable(test, low, data_range),
        _displayable((test.float() - reference.float()).abs() * DIFF_GAIN, 0.0, data_range),
    ]
    scale = max(1, 96 // reference.shape[-2])
    return save_image_grid(rows, path, scale, ["BF16", "FP8", f"|FP8 - BF16| x{DIFF_GAIN}"])
