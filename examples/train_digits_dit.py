"""Train the small class-conditional digits DiT that the quality tests and the validation use.

    python examples/train_digits_dit.py                       # GPU if present (6000 steps of 128)
    python examples/train_digits_dit.py --device cpu --threads 1 --minutes 15 --batch-size 64

The shipped checkpoint was trained on one CPU thread of a shared machine: the second command
(1264 steps), then ``--init fp8_compile/assets/digits_dit --minutes 12 --batch-size 64 --lr 7e-4
--warmup 0.02`` (1137 more steps), final loss about 0.08.

Data: the 1797 8x8 handwritten digits that ship inside scikit-learn (``load_digits``, no
download), upsampled to 32x32 and scaled to [-1, 1]. Model: ``fp8_compile.digits.MODEL_CONFIG``
(diffusers' DiTTransformer2DModel, 2.1 M parameters). Objective: flow matching (predict
``noise - x0`` at a logit-normal noise level); one label in ten is dropped to the null label by
the model's own label embedding, which is what classifier-free guidance needs. The EMA weights
are saved with ``save_pretrained`` (config.json + safetensors) and a sample grid is written
next to them. Needs scikit-learn (``pip install -e '.[train]'``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fp8_compile.digits import (
    DIGITS_DIT_DIR,
    IMAGE_SIZE,
    TIMESTEP_SCALE,
    build_digits_dit,
    load_digits_dit,
    sample_digits,
)
from fp8_compile.flow_matching import noisy_sample, velocity_target
from fp8_compile.validation.pictures import save_image_grid

logger = logging.getLogger("fp8_compile")


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ([N, 1, 32, 32] in [-1, 1], [N] labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # 0..16 grey levels
    pixels = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return pixels * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(x0)
    # Logit-normal noise levels (as in SD3) weight the middle of the trajectory, where the
    # velocity is hardest to predict.
    sigma = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    prediction = model(
        noisy_sample(x0, noise, sigma), timestep=sigma * TIMESTEP_SCALE, class_labels=labels, return_dict=False
    )[0]
    return F.mse_loss(prediction, velocity_target(x0, noise))


def learning_rate(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of training, then cosine decay to a tenth
    of the peak; ``progress`` in [0, 1]."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    decay = (progress - warmup) / (1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0))))


def ema_decay(step: int, limit: float) -> float:
    """Short averaging early on, when the weights change fast, growing to ``limit``."""
    return min(limit, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)


def train(args: argparse.Namespace) -> nn.Module:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    images, labels = load_digit_images()
    images, labels = images.to(device), labels.to(device)
    model = build_digits_dit(torch.float32, device).train()
    if args.init is not None:  # continue from a saved checkpoint (its weights; the optimizer starts afresh)
        model.load_state_dict(load_digits_dit(torch.float32, device, args.init).state_dict())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    logger.info("training %.2f M parameters on %d digits, %s", sum(p.numel() for p in model.parameters()) / 1e6,
                len(images), device)

    start, budget = time.monotonic(), args.minutes * 60
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        # The schedule follows whichever runs out first, the steps or the wall-time budget, so a
        # run cut short by the budget still ends at a low learning rate.
        progress = max(step / args.steps, (time.monotonic() - start) / budget)
        if progress >= 1:
            logger.warning("stopped at step %d of %d: the %.1f-minute budget is spent", step, args.steps, args.minutes)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, args.lr, args.warmup)
        batch = torch.randint(0, len(images), (args.batch_size,), device=device)
        loss = flow_matching_loss(model, images[batch], labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, ema_decay(step, args.ema_decay))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{group['lr']:.2e}")
    return ema


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--minutes", type=float, default=15.0, help="stop early when this wall time is spent")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of training spent warming up")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="a checkpoint folder to continue training from")
    parser.add_argument("--out", type=Path, default=DIGITS_DIT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = train(args)
    # Saved in BF16, the dtype the model is validated in; that halves the checkpoint.
    model.to(torch.bfloat16).save_pretrained(args.out)
    rows = [sample_digits(model, list(range(10)), seed=seed) for seed in range(4)]
    grid = save_image_grid(rows, args.out / "samples.png", scale=3)
    logger.info("saved %s and a sample grid %s", args.out, grid)


if __name__ == "__main__":
    main()
