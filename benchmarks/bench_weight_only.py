"""The weight-only FP8 GEMM (the SM80 lowering) against BF16 cuBLAS, at the FLUX.1-dev shapes.

    python benchmarks/bench_weight_only.py --out $OUT/weight_only_gemm.json

For each (M, K, N) of one FLUX.1-dev forward at 1024x1024 (M = 4608 tokens; M = 1 for the
conditioning GEMVs): BF16 ``F.linear`` (cuBLAS), ``fp8_compile``'s Triton weight-only kernel
(FP8 weight converted tile by tile inside the GEMM) and a dequantize-then-matmul (the
full-size BF16 copy the weight-only kernel avoids), each the median of CUDA-event timings,
cycling through several copies of the weight so that it is read from HBM as in the model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_dit import cuda_time_ms  # noqa: E402

from fp8_compile.ops import quantize_weight  # noqa: E402
from fp8_compile.triton_kernels import weight_only_mm  # noqa: E402

# (M, K, N): the block GEMMs at 4608 tokens, then the modulation GEMVs of one image
FLUX_SHAPES = [
    (4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072),
    (1, 3072, 18432), (1, 3072, 9216), (1, 3072, 6144),
]
ROTATE_BYTES = 256 * 2**20  # FP8 weight bytes cycled through per shape: ~5x the H100's 50 MB L2


def measure(m: int, k: int, n: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    # Each timed call reads another copy of the weight, so that the weights read in a row
    # (several times L2) come from HBM as they do in the model, not from L2.
    copies = max(2, -(-ROTATE_BYTES // (n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    quantized = [quantize_weight(w, "per_row") for w in weights]
    w, (w_fp8, w_scale) = weights[0], quantized[0]
    reference = F.linear(x.float(), (w_fp8.float() * w_scale.float()), bias.float())
    out = weight_only_mm(x, w_fp8, w_scale, bias)
    bf16_weights, fp8_weights = itertools.cycle(weights), itertools.cycle(quantized)

    def dequantize_then_mm():
        w_fp8, w_scale = next(fp8_weights)
        return F.linear(x, (w_fp8.to(x.dtype) * w_scale.to(x.dtype)), bias)

    timings = {
        "bf16": cuda_time_ms(lambda: F.linear(x, next(bf16_weights), bias), 3, 20),
        "weight_only_fp8": cuda_time_ms(lambda: weight_only_mm(x, *next(fp8_weights), bias), 3, 20),
        "dequantize_then_mm": cuda_time_ms(dequantize_then_mm, 3, 20),
    }
    row = {"m": m, "k": k, "n": n, "weight_copies": copies, **{f"{name}_ms": round(t, 4) for name, t in timings.items()}}
    row["weight_only_vs_bf16"] = round(timings["bf16"] / timings["weight_only_fp8"], 3)
    row["rel_err"] = round(((out.float() - reference).norm() / reference.norm()).item(), 5)
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
    for shape in FLUX_SHAPES:
        row = measure(*shape)
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
