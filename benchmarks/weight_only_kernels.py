"""Experiment: forms of the weight-only FP8 GEMM on Hopper, against cuBLAS BF16 (issue 5).

    python benchmarks/weight_only_kernels.py --out $OUT/weight_only_kernels.json

Forms, each timed as GPU time per call over rotating weight copies (see bench_weight_only):
- ``current``: fp8_compile's kernel (pointer loads, the converted weight as the left operand).
- ``tma_left``: tile loads through tensor descriptors (Hopper's copy engine), the converted
  weight as the left (register) operand of wgmma.
- ``tma_right``: tensor descriptors, the converted weight as the right (shared-memory) operand.
- ``tma_left_bf16`` / ``tma_right_bf16``: the same kernels on a BF16 weight: what Triton's GEMM
  reaches without any conversion, the ceiling of each form.
- ``*_ws``: the same with Triton's warp specialization (``tl.range(..., warp_specialize=True)``).

Measured on an H100 (BENCHMARKS.md, 2026-11-27_weight_only_kernels_*.json): the BF16 ceiling is
0.67-0.82x of cuBLAS, the converting forms 0.50-0.68x, and the warp-specialized forms do not
compile with Triton 3.6. This is why compute-bound weight-only GEMMs run cuBLAS on dequantized
weight slices instead (``fp8_compile.ops.dequantized_chunks_mm``).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_weight_only import ROTATE_BYTES, graph_time_ms

from fp8_compile.ops import quantize_weight
from fp8_compile.triton_kernels import weight_only_mm

SHAPES = [(4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072)]

CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk}, num_stages=s, num_warps=w)
    for bn, bm, bk, s, w in [
        (128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8),
        (128, 256, 128, 2, 8), (256, 128, 128, 2, 8), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
        (256, 64, 64, 4, 4),
    ]
]


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    group_m: tl.constexpr = 8
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (group_m * num_n)
    first_m = group * group_m
    size = min(num_m - first_m, group_m)
    return first_m + (pid % (group_m * num_n)) % size, (pid % (group_m * num_n)) // size


@triton.autotune(configs=CONFIGS, key=["M", "N", "K", "LEFT", "WS"])
@triton.jit
def _tma_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                LEFT: tl.constexpr, WS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if LEFT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, warp_specialize=WS):
            x = x_desc.load([m0, k])
            w = w_desc.load([n0, k]).to(tl.bfloat16)
            acc = tl.dot(w, x.T, acc)
        acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N)[:, None]
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N).to(tl.float32)[:, None]
        out_desc.store([m0, n0], acc.T.to(tl.bfloat16))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, warp_specialize=WS):
            x = x_desc.load([m0, k])
            w = w_desc.load([n0, k]).to(tl.bfloat16)
            acc = tl.dot(x, w.T, acc)
        acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N)[None, :]
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N).to(tl.float32)[None, :]
        out_desc.store([m0, n0], acc.to(tl.bfloat16))


def tma_mm(x, w, scale, bias, left: bool, ws: bool = False):
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _tma_kernel[grid](x, w, scale.reshape(-1), bias, out, M, N, K, LEFT=left, WS=ws)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        copies = max(2, -(-ROTATE_BYTES // (n * k)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quantized = [quantize_weight(w, "per_row") for w in weights]
        dequantized = [(w.to(torch.bfloat16), s.float().reshape(-1)) for w, s in quantized]
        w8, s8 = quantized[0]
        reference = F.linear(x.float(), w8.float() * s8.float().reshape(-1, 1), bias.float())
        forms = {
            "bf16_cublas": [partial(F.linear, x, w, bias) for w in weights],
            "current": [partial(weight_only_mm, x, w, s, bias) for w, s in quantized],
            "tma_left": [partial(tma_mm, x, w, s, bias, True) for w, s in quantized],
            "tma_right": [partial(tma_mm, x, w, s, bias, False) for w, s in quantized],
            "tma_left_ws": [partial(tma_mm, x, w, s, bias, True, True) for w, s in quantized],
            "tma_right_ws": [partial(tma_mm, x, w, s, bias, False, True) for w, s in quantized],
            "tma_right_bf16_ws": [partial(tma_mm, x, w, s, bias, False, True) for w, s in dequantized],
            "tma_left_bf16": [partial(tma_mm, x, w, s, bias, True) for w, s in dequantized],
            "tma_right_bf16": [partial(tma_mm, x, w, s, bias, False) for w, s in dequantized],
        }
        row = {"m": m, "k": k, "n": n}
        for name, calls in forms.items():
            try:
                out = calls[0]()
                if name != "bf16_cublas":
                    row[f"{name}_err"] = round(((out.float() - reference).norm() / reference.norm()).item(), 5)
                row[f"{name}_ms"] = round(graph_time_ms(calls), 4)
                if name.startswith("tma"):
                    row[f"{name}_config"] = str(_tma_kernel.best_config)
            except Exception as error:  # an experiment: record the failure and go on
                row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[-600:]}"
        for name in forms:
            if f"{name}_ms" in row:
                row[f"{name}_vs_bf16"] = round(row["bf16_cublas_ms"] / row[f"{name}_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del weights, quantized, dequantized, forms
        torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "shapes": rows}, indent=1))
    for row in rows:
        print(row["m"], row["k"], row["n"], {k: v for k, v in row.items() if k.endswith("_vs_bf16")})


if __name__ == "__main__":
    main()
