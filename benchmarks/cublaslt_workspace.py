"""Does cuBLASLt's workspace size change which FP8 GEMM kernel it picks, and the memset before it?

For FLUX.1-dev's GEMM shapes (rowwise-scaled ``torch._scaled_mm``, bf16 output with bias, fast
accumulation): the median of 30 CUDA-event timings of one call after 10 warm-up calls, and the
kernels and memsets of 5 calls under the profiler. torch reads CUBLASLT_WORKSPACE_SIZE (KiB) once
per process, so each setting runs in a child process.

    python3 benchmarks/cublaslt_workspace.py --out results.json
"""

import argparse
import json
import os
import subprocess
import sys

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 15360), (4096, 3072, 3072), (512, 3072, 3072), (4096, 12288, 3072)]
WORKSPACES = [None, "0", "1024", "8192"]  # None: torch's default


def measure(workspace: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    shapes = []
    for m, n, k in SHAPES:
        x = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        scale_a, scale_b = torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)

        def gemm():
            return torch._scaled_mm(x, w.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)

        for _ in range(10):
            gemm()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            gemm()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                gemm()
            torch.cuda.synchronize()
        events: dict[str, int] = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                events[e.name[:70]] = events.get(e.name[:70], 0) + 1
        shapes.append({"mnk": [m, n, k], "median_us": sorted(times)[len(times) // 2], "events_per_5_calls": events})
    return {"workspace": workspace, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    settings = []
    for workspace in WORKSPACES:
        env = dict(os.environ)
        if workspace is not None:
            env["CUBLASLT_WORKSPACE_SIZE"] = workspace
        child = subprocess.run([sys.executable, __file__, "--out", args.out, "--child", str(workspace)], env=env, capture_output=True, text=True, check=True)
        settings.append(json.loads(child.stdout.strip().splitlines()[-1]))
    with open(args.out, "w") as f:
        json.dump({"settings": settings}, f, indent=1)


if __name__ == "__main__":
    main()
