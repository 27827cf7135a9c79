"""The weight-only FP8 GEMM (the SM80 lowering) against BF16 cuBLAS, at the FLUX.1-dev shapes.

    python benchmarks/bench_weight_only.py --out $OUT/weight_only_gemm.json

For each (M, K, N) of one FLUX.1-dev forward at 1024x1024 (M = 4608 tokens; M = 1 for the
conditioning GEMVs), and for fewer rows at two of its shapes: BF16 ``F.linear`` (cuBLAS);
``fp8_compile``'s Triton weight-only kernel (each FP8 weight tile converted inside the GEMM);
cuBLAS on weight slices dequantized one at a time (``dequantized_chunks_mm``) with slices of
8M, 32M elements or the whole weight, its bias added by a kernel of its own (in the model,
Inductor fuses that add into the next element-wise kernel). Each is timed as GPU time per call: the calls, one per copy
of the weight (so that weights are read from HBM, as in the model), are captured in a CUDA
graph, and its replays timed with CUDA events (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8_compile import ops
from fp8_compile.triton_kernels import weight_only_mm

# (M, K, N): the block GEMMs at 4608 tokens, then the modulation GEMVs of one image
FLUX_SHAPES = [
    (4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072),
    (1, 3072, 18432), (1, 3072, 9216), (1, 3072, 6144),
]
# fewer rows (short sequences, text encoders): where reading half the weight bytes starts to lose
ROW_SWEEP = [(m, 3072, n) for n in (3072, 12288) for m in (256, 512, 1024, 2048)]
CHUNK_BUDGETS = {"8M": 1 << 23, "32M": 1 << 25, "whole": 1 << 40}
ROTATE_BYTES = 256 * 2**20  # FP8 weight bytes cycled through per shape: ~5x the H100's 50 MB L2


def graph_time_ms(calls: list[Callable[[], torch.Tensor]], replays: int = 20) -> float:
    """GPU time per call of ``calls``, captured once into a CUDA graph and replayed: no host
    time between kernels. (Timing eager calls would time the Python dispatch of a small
    kernel, ~0.1 ms, instead of the kernel, which in the model runs from compiled code.)"""
    for call in calls:  # warm-up, and the autotuner picks its config before the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def chunked(budget: int, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    ops.DEQUANTIZED_CHUNK_ELEMENTS = budget
    return ops.dequantized_chunks_mm(x, weight, scale) + bias  # in the model the bias joins the next kernel


def measure(m: int, k: int, n: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    # One call per copy of the weight, so that the weights read in a row (several times L2)
    # come from HBM as they do in the model, not from L2.
    copies = max(2, -(-ROTATE_BYTES // (n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    quantized = [ops.quantize_weight(w, "per_row") for w in weights]
    w_fp8, w_scale = quantized[0]
    reference = F.linear(x.float(), (w_fp8.float() * w_scale.float()), bias.float())
    forms = {
        "bf16": [partial(F.linear, x, w, bias) for w in weights],
        "triton_weight_only": [partial(weight_only_mm, x, w, s, bias) for w, s in quantized],
        **{
            f"dequantized_chunks_{name}": [partial(chunked, budget, x, w, s, bias) for w, s in quantized]
            for name, budget in CHUNK_BUDGETS.items()
        },
    }
    row = {"m": m, "k": k, "n": n, "weight_copies": copies}
    for name, calls in forms.items():
        if name != "bf16":
            out = calls[0]()
            row[f"{name}_rel_err"] = round(((out.float() - reference).norm() / reference.norm()).item(), 5)
        row[f"{name}_ms"] = round(graph_time_ms(calls), 4)
    ops.DEQUANTIZED_CHUNK_ELEMENTS = CHUNK_BUDGETS["8M"]
    for name in forms:
        row[f"{name}_vs_bf16"] = round(row["bf16_ms"] / row[f"{name}_ms"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results = {
        "env": dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                    date=time.strftime("%Y-%m-%d")),
        "shapes": [],
    }
    for shape in FLUX_SHAPES + ROW_SWEEP:
        row = measure(*shape)
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    for row in results["shapes"]:
        print(row["m"], row["k"], row["n"], {k[:-8]: v for k, v in row.items() if k.endswith("_vs_bf16")})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
