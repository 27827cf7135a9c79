"""Host (CPU) time per call of the ops an FP8 forward launches, on operands so small that the
GPU never holds the host back: what each launch costs the host, and so how many of them a
forward can issue in the time its kernels take.

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fp8_compile import attention, ops

CALLS = 400


def host_us(fn, calls: int = CALLS, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean host microseconds per call of ``fn`` over ``calls`` calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return round(statistics.median(means), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda"
    results: dict[str, float] = {}

    q, k, v = (torch.randn(1, 2, 64, 64, device=device).to(torch.float8_e4m3fn) for _ in range(3))
    one = torch.ones((), device=device)
    sdpa_args = (q, k, v, one, one, one, one, 0.125)
    attention.prepare_device(q.device)
    results["fp8_sdpa (custom op)"] = host_us(lambda: torch.ops.fp8_compile.fp8_sdpa(*sdpa_args))
    results["fp8_sdpa body, no dispatcher"] = host_us(lambda: attention._cudnn_sdpa(*sdpa_args))

    a = torch.randn(64, 64, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(64, 64, device=device).to(torch.float8_e4m3fn).t()
    results["_scaled_mm"] = host_us(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16))
    results["empty"] = host_us(lambda: torch.empty(64, device=device))

    # to_q / to_k / to_v: three GEMMs, or one over their tensors laid out back to back
    x8, x_scale = a, torch.ones(64, 1, device=device)
    qkv = [torch.randn(64, 64, device=device).to(torch.float8_e4m3fn) for _ in range(3)]
    qkv_scales = [torch.ones(64, 1, device=device) for _ in range(3)]
    qkv_biases = [torch.zeros(64, device=device, dtype=torch.bfloat16) for _ in range(3)]
    for tensors in (qkv, qkv_scales, qkv_biases):
        ops.packed_rows(tensors)

    def three_gemms():
        for w, s, bias in zip(qkv, qkv_scales, qkv_biases):
            torch._scaled_mm(x8, w.t(), x_scale, s.t(), bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)

    packed = torch.ops.fp8_compile.packed_fp8_matmul.default
    results["q/k/v: 3 x _scaled_mm (per-row scales, bias)"] = host_us(three_gemms)
    results["q/k/v: packed_fp8_matmul (one GEMM)"] = host_us(
        lambda: packed(x8, x_scale, qkv, qkv_scales, qkv_biases, torch.bfloat16, True)
    )

    text, image = (torch.randn(1, t, 4, 128, device=device, dtype=torch.bfloat16) for t in (8, 24))
    weights = [torch.ones(128, device=device, dtype=torch.bfloat16) for _ in range(2)]
    angles = torch.rand(32, 64, device=device)
    cos, sin = (t.repeat_interleave(2, dim=-1)[None, :, None] for t in (angles.cos(), angles.sin()))
    rotary = (text, image, *weights, 1e-6, 1e-6, cos, sin, 2.0)
    results["rms_norm_rotary_fp8 eager"] = host_us(lambda: attention.rms_norm_rotary_fp8(*rotary))

    def eight_queries(text, image, cos, sin):
        return [attention.rms_norm_rotary_fp8(text * (i + 1), image, *weights, 1e-6, 1e-6, cos, sin, 2.0)[0] for i in range(8)]

    def eight_scales(text, image, cos, sin):
        return [(text * (i + 1)).float().amax() for i in range(8)]

    compiled_queries = torch.compile(eight_queries, fullgraph=True)
    compiled_scales = torch.compile(eight_scales, fullgraph=True)
    # per fused op: the compiled call minus the same call with an Inductor kernel in its place
    with_op = host_us(lambda: compiled_queries(text, image, cos, sin), calls=100)
    without = host_us(lambda: compiled_scales(text, image, cos, sin), calls=100)
    results["rms_norm_rotary_fp8 compiled, per op"] = round((with_op - without) / 8, 2)
    results["compiled call of 8 Inductor reductions"] = without

    print(json.dumps(results, indent=1))
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        with open(args.out, "w") as f:
            json.dump({"env": env, "host_us_per_call": results}, f, indent=1)


if __name__ == "__main__":
    main()
