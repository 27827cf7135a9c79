"""A full-size DiT in FP8 on several GPUs: omni_fp8 with diffusers' context parallelism.

    torchrun --nproc-per-node 2 examples/context_parallel.py --model flux --steps 4 --cudagraphs
    torchrun --nproc-per-node 2 examples/context_parallel.py --model wan --cp ring

One process per GPU. Every rank builds the same transformer (FLUX.1-dev or one Wan2.2-A14B
expert, random weights from one seed), and then, in this order:

1. converts its weights to FP8 with ``fp8_compile.quantize_`` (once per rank);
2. shards the sequence over the ranks with ``enable_parallelism(ContextParallelConfig(...))``;
3. compiles with ``backend="omni_fp8"`` (regional by default, or the whole model), with
   ``--cudagraphs`` replaying each compiled block as a CUDA graph: under Ulysses attention the
   host, not the GPU, sets the pace without them (docs/multi_gpu.md has the figures);

and runs a few Euler steps of a flow-matching denoising loop on random latents. Rank 0 prints
the quantization report, the time of each step and the peak memory. docs/multi_gpu.md says why
the order matters and what composes.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers import ContextParallelConfig
from tqdm.auto import tqdm

import fp8_compile
from fp8_compile.zoo import DITS, Resolution

MODELS = {  # the zoo's full-size spec, its default resolution and the timestep at sigma = 1
    "flux": ("flux", Resolution(1024, 1024, text_tokens=512), 1.0),
    "wan": ("wan", Resolution(480, 832, frames=81, text_tokens=512), 1000.0),
}
# Ring attention merges partial results by their log-sum-exp; diffusers' default (native SDPA)
# backend accepts a ring config but cannot return it and fails on the first forward.
RING_ATTENTION_BACKEND = "_native_cudnn"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="flux")
    parser.add_argument("--cp", choices=["ulysses", "ring"], default="ulysses", help="how attention is sharded")
    parser.add_argument("--compile", choices=["regional", "whole"], default="regional")
    parser.add_argument("--cudagraphs", action="store_true", help="replay the compiled graphs as CUDA graphs")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, help="video frames (wan; default 81)")
    parser.add_argument("--ignored-layers", default="", help="comma-separated patterns kept in BF16")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def init_distributed() -> torch.device:
    """Join the torchrun job with NCCL, one GPU per process."""
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def build_fp8_parallel(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict]:
    """The transformer, converted, sharded and compiled; and the inputs of its first step."""
    name, resolution, _ = MODELS[args.model]
    if args.frames:
        resolution = Resolution(resolution.height, resolution.width, args.frames, resolution.text_tokens)
    spec = DITS[name]
    torch.manual_seed(args.seed)  # the same weights and inputs on every rank
    model = spec.build("full", torch.bfloat16, device)
    torch.manual_seed(args.seed + 1)
    inputs = spec.inputs(model, resolution, torch.bfloat16, device)

    options = {"ignored_layers": [p for p in args.ignored_layers.split(",") if p], "cudagraphs": args.cudagraphs}
    report = fp8_compile.quantize_(model, options)  # before enable_parallelism: see docs/multi_gpu.md
    if args.cp == "ring":
        model.set_attention_backend(RING_ATTENTION_BACKEND)
    degree = dist.get_world_size()
    config = ContextParallelConfig(ring_degree=degree) if args.cp == "ring" else ContextParallelConfig(ulysses_degree=degree)
    model.enable_parallelism(config=config)
    if dist.get_rank() == 0:
        print(f"{type(model).__name__} on {degree} GPUs ({args.cp}): {report.summary()}", flush=True)
    if args.compile == "whole":
        return torch.compile(model, backend="omni_fp8", options=options), inputs
    model.compile_repeated_blocks(backend="omni_fp8", options=options)
    if args.cudagraphs:
        fp8_compile.mark_cudagraph_steps(model)  # one CUDA-graph generation per forward, not per block
    return model, inputs


def denoise(model: nn.Module, inputs: dict, steps: int, timestep_scale: float) -> tuple[torch.Tensor, list[float]]:
    """Euler steps of flow matching from sigma 1 to 0; returns the latents and seconds per step."""
    latents = inputs["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    seconds = []
    progress = tqdm(range(steps), desc="denoising", disable=dist.get_rank() != 0)
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        start = time.perf_counter()
        timestep = torch.full_like(inputs["timestep"], sigma * timestep_scale)
        velocity = model(**{**inputs, "hidden_states": latents, "timestep": timestep})[0]
        latents = latents + (next_sigma - sigma) * velocity
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        progress.update()
    progress.close()
    return latents, seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = init_distributed()
    try:
        model, inputs = build_fp8_parallel(args, device)
        with torch.no_grad():
            latents, seconds = denoise(model, inputs, args.steps, MODELS[args.model][2])
        if dist.get_rank() == 0:
            steps = ", ".join(f"{s:.2f}" for s in seconds)
            print(f"seconds per step: {steps} (the first steps compile)")
            print(f"latents {tuple(latents.shape)}, finite: {bool(latents.isfinite().all())}")
            print(f"peak GPU memory on rank 0: {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
