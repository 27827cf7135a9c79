"""Side-by-side benchmark of a full-size DiT (random weights) on one GPU.

    python benchmarks/bench_dit.py --model flux --rows bf16_eager,bf16_regional,omni_fp8_row \
        --out benchmarks/results/flux.json

Every row builds the same model (same seed), converts/compiles it its own way and reports:
ms per forward (median of CUDA-event timings after warm-up, each forward synchronized alone), ms
per forward of forwards issued back to back as a denoising loop issues them, cold compile seconds (first calls
until the compiled graph runs), weight GB, peak GB during conversion and during the timed
forward, and the relative error of the output against BF16 eager. ``--floor`` adds the floor
(each GEMM shape at the FP8 rate measured here, plus the measured attention time); ``--profile
ROW`` adds a per-category breakdown of that row's GPU time from torch.profiler and its host
time; ``--warm-compile ROW`` compiles the row again in a second process with warm caches.
``--isolate`` runs each row in a process of its own, one after the other on the same GPU: a
row's speed then does not depend on the rows before it (second FP8 rows of one process were
measured 7-50% slower than first ones, ninth session). Row names are flags joined by "_":
"regional" (the default) compiles the repeated blocks, "regions" the blocks and the modules around
them (``fp8_compile.compile_regions``), "whole" the whole model; the other flags are in ``prepare``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8_compile
import fp8_compile.inductor
from fp8_compile.backend import FP8_PASSES
from fp8_compile.passes import (
    FeedFp8AttentionOutput,
    FuseNormRotaryQuantization,
    FuseSiblingGemms,
    QuantizeAttention,
    RealRotaryEmbedding,
)
from fp8_compile.zoo import DITS, Resolution, first_output

ALL_PASSES = list(FP8_PASSES.passes)

RESOLUTIONS = {
    "flux": Resolution(1024, 1024, text_tokens=512),
    "qwen_image": Resolution(1024, 1024, text_tokens=512),
    "z_image": Resolution(1024, 1024, text_tokens=512),
    "wan": Resolution(480, 832, frames=81, text_tokens=512),
}


@dataclass
class Row:
    name: str
    ms: float = float("nan")
    # ms per forward of forwards issued back to back, one synchronize after the last, as a denoising
    # loop issues them: the host prepares the next forward while the GPU still runs this one
    loop_ms: float = float("nan")
    compile_s: float = float("nan")
    weight_gb: float = float("nan")
    peak_gb: float = float("nan")
    conversion_peak_gb: float = float("nan")  # peak while converting, before the first call
    warm_compile_s: float = float("nan")  # the same row in a second process, caches warm
    rel_err: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes held by ``t``; a tensor subclass (torchao's float8 weights) by its inner tensors,
    since its own element size is that of the dtype it stands for."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_gb(model: nn.Module) -> float:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total / 1e9


def back_to_back_ms(fn, iters: int) -> float:
    """ms per call of ``fn`` over ``iters`` calls issued back to back between two CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def cuda_time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torchao_convert(model: nn.Module, granularity: str) -> None:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    if granularity == "weightonly":
        quantize_(model, Float8WeightOnlyConfig())
    else:
        gran = PerRow() if granularity == "row" else PerTensor()
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=gran))


def prepare(row: str, model: nn.Module) -> tuple[nn.Module, str]:
    """Convert and wrap ``model`` as the row says; returns the callable module and a note."""
    parts = row.split("_")
    # "regions": the blocks and, compiled on their own, the modules around them (fp8_compile.compile_regions)
    style = "whole" if "whole" in parts else "regions" if "regions" in parts else "regional"
    cudagraphs = "cudagraphs" in parts
    mode = "reduce-overhead" if cudagraphs and not row.startswith("omni_fp8") else None
    if row == "bf16_eager":
        return model, "eager"
    if row.startswith("torchao"):
        torchao_convert(model, "row" if "row" in parts else "weightonly" if "weightonly" in parts else "tensor")
        if "eager" in parts:
            return model, "eager"
    if row.startswith("bf16") or row.startswith("torchao"):
        backend, options = "inductor", None
    elif row.startswith("omni_fp8"):
        # "defaultred": Inductor's own persistent-reduction limit, to measure what ours buys
        fp8_compile.inductor.PERSISTENT_REDUCTION_LIMIT = 0 if "defaultred" in parts else 4096 if "p4k" in parts else 16384
        # "complexrope": without the pass that writes complex rotary embeddings in real arithmetic;
        # "amax": FP8 attention's Q and K scaled by their measured amax, not their norm's bound;
        # "unfused": Q and K normalized, rotated and cast by Inductor's kernels, not the fused one;
        # "requant": the attention output dequantized and quantized again for the layer after it;
        # "separate": layers that read one activation (to_q / to_k / to_v) keep a GEMM each
        left_out = (
            (RealRotaryEmbedding,) * ("complexrope" in parts)
            + (FuseNormRotaryQuantization,) * ("unfused" in parts)
            + (FeedFp8AttentionOutput,) * ("requant" in parts)
            + (FuseSiblingGemms,) * ("separate" in parts)
        )
        FP8_PASSES.passes = [
            QuantizeAttention(bound_operands="amax" not in parts) if isinstance(p, QuantizeAttention) else p
            for p in ALL_PASSES
            if not isinstance(p, left_out)
        ]
        options = {
            "granularity": "per_tensor" if "tensor" in parts else "per_row",
            "fast_accum": "exact" not in parts,
            "cudagraphs": cudagraphs,
            "lowering": "weight_only" if "weightonly" in parts else "auto",
            "fp8_attention": "fa8" in parts,  # "fa8": attention in FP8 too (needs nvidia-cudnn-frontend)
        }
        fp8_compile.quantize_(model, options)
        backend = "omni_fp8"
    else:
        raise SystemExit(f"unknown row {row!r}")
    kwargs = {"backend": backend}
    if options:
        kwargs["options"] = options
    if mode:
        kwargs["mode"] = mode
    if style in ("regional", "regions"):
        if style == "regions":
            fp8_compile.compile_regions(model, fullgraph=True, **kwargs)
        else:
            model.compile_repeated_blocks(fullgraph=True, **kwargs)
        if cudagraphs and style == "regional":  # compile_regions marks them itself
            fp8_compile.mark_cudagraph_steps(model)  # one CUDA-graph generation per forward
        return model, f"{style} {kwargs}"
    return torch.compile(model, **kwargs), f"whole {kwargs}"


def run_row(row: str, spec, res: Resolution, reference: torch.Tensor | None, args) -> tuple[Row, torch.Tensor]:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = spec.build("full", torch.bfloat16, "cuda")
    torch.manual_seed(1)
    inputs = spec.inputs(model, res, torch.bfloat16, "cuda")
    result = Row(row)
    # "cdt": Inductor's coordinate-descent tuning of element-wise kernel configs; "pdl": its
    # Triton kernels launched with programmatic dependent launch (Hopper), each starting while
    # the kernel before it drains
    # "combo": Inductor's combo kernels, independent small kernels launched as one
    # "cppwrapper": Inductor's generated code calls the kernels from C++, not Python
    patches = {
        "coordinate_descent_tuning": "cdt" in row.split("_"),
        "combo_kernels": "combo" in row.split("_"),
        "cpp_wrapper": "cppwrapper" in row.split("_"),
    }
    if "pdl" in row.split("_"):
        if not hasattr(torch._inductor.config.triton, "enable_pdl"):
            raise SystemExit(f"row {row!r}: this torch's Inductor has no triton.enable_pdl")
        patches["triton.enable_pdl"] = True
    tuning = torch._inductor.config.patch(patches)
    with torch.no_grad(), tuning:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        runner, result.note = prepare(row, model)
        result.conversion_peak_gb = torch.cuda.max_memory_allocated() / 1e9
        for _ in range(2):  # compiled by the end of the 2nd call in every row
            runner(**inputs)
        torch.cuda.synchronize()
        result.compile_s = time.perf_counter() - start if row != "bf16_eager" else 0.0
        # where the compile went: the largest of Dynamo's and Inductor's timed phases (they nest)
        phases = {name: sum(values) for name, values in torch._dynamo.utils.compilation_time_metrics.items()}
        result.extra["compile_phases_s"] = {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])[:12]}
        result.weight_gb = weight_gb(model)
        torch.cuda.reset_peak_memory_stats()
        result.ms = cuda_time_ms(lambda: runner(**inputs), args.warmup, args.iters)
        result.loop_ms = back_to_back_ms(lambda: runner(**inputs), args.iters)
        result.peak_gb = torch.cuda.max_memory_allocated() / 1e9
        out = first_output(runner(**inputs))
        if reference is not None:
            result.rel_err = ((out - reference).norm() / reference.norm()).item()
        if args.profile and row in args.profile:
            result.extra["breakdown_ms"] = profile_breakdown(lambda: runner(**inputs), args.host_calls)
    del model, runner, inputs
    return result, out


def classify(kernel: str) -> str:
    k = kernel.lower()
    if "nccl" in k:
        return "communication (nccl)"
    if "weight_only" in k:
        return "gemv (weight-only fp8)"
    if k.startswith("_quantize_rows"):
        return "quantize (Triton row kernel, with GELU/SiLU)"
    if k.startswith("triton_") and not k.startswith("triton_tem"):
        # Inductor names a kernel after the ops fused into it
        return "quantize (fused into producer)" if "amax" in k or ("clamp" in k and "to_copy" in k) else "other elementwise"
    if any(s in k for s in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(s in k for s in ("nvjet", "gemm", "cutlass", "xmma")) or k.startswith("triton_tem"):
        return "fp8 gemm" if any(s in k for s in ("qqtst", "e4m3", "fp8", "f8f8")) else "bf16 gemm"
    return "other elementwise"


def profile_breakdown(fn, host_calls: bool = False) -> dict[str, float]:
    """GPU time per kernel category of one call of ``fn``; with ``host_calls``, also the host
    (CPU) calls that took the most time, to tell a launch-bound call from one that waits."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    # Host time: how long the Python call takes to return with an empty launch queue. When it is
    # close to the forward's GPU time, the GPU waits on the host (launch-bound).
    start = time.perf_counter()
    fn()
    host_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host_calls else [])
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: Counter = Counter()
    kernels: dict[str, list] = defaultdict(lambda: [0, 0.0])
    # idle GPU time before each kernel, charged to the category of the kernel that ran before it:
    # where the wall time beyond the kernel sum goes
    idle_after: dict[str, float] = defaultdict(float)
    idle_between: Counter = Counter()  # the same idle time by the pair of nodes around it
    device_events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    previous = None
    # idle time by tenth of the forward: a host that is behind early (the forward's start) or throughout
    idle_by_tenth = [0.0] * 10
    if device_events:
        first_start = device_events[0].time_range.start
        span = max(1e-9, device_events[-1].time_range.end - first_start)
    for event in device_events:
        category = classify(event.name)
        totals[category] += event.device_time_total / 1e3
        counts[category] += 1
        kernels[event.name][0] += 1
        kernels[event.name][1] += event.device_time_total / 1e3
        if previous is not None:
            gap = max(0.0, event.time_range.start - previous.time_range.end) / 1e3
            idle_after[classify(previous.name)] += gap
            idle_between[f"{previous.name[:48]} -> {event.name[:48]}"] += gap
            idle_by_tenth[min(9, int(10 * (event.time_range.start - first_start) / span))] += gap
        previous = event
    result = {k: round(v, 3) for k, v in sorted(totals.items())}
    result["host_ms"] = round(host_ms, 3)
    if device_events:
        result["gpu_span_ms"] = round((device_events[-1].time_range.end - device_events[0].time_range.start) / 1e3, 3)
    result["idle_after_ms"] = {k: round(v, 3) for k, v in sorted(idle_after.items())}
    # the forward's first nodes: name, start (us from the first node's) and the GPU idle before it
    result["first_nodes"] = [
        (e.name[:40], round((e.time_range.start - device_events[0].time_range.start), 1),
         round(max(0.0, e.time_range.start - p.time_range.end), 1) if p is not None else 0.0)
        for p, e in zip([None, *device_events[:79]], device_events[:80])
    ]
    result["idle_by_tenth_ms"] = [round(v, 3) for v in idle_by_tenth]
    result["idle_between_ms"] = {k: round(v, 3) for k, v in idle_between.most_common(25)}
    result["kernel_counts"] = dict(counts)
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    result["kernels"] = {name[:160]: [calls, round(ms, 3)] for name, (calls, ms) in ranked}
    if host_calls:
        host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
        result["top_host_calls"] = {e.key[:120]: [round(e.self_cpu_time_total / 1e3, 3), e.count] for e in host}
        # which host calls issue the "Memset (Device)" work (each one a GPU node of its own)
        memsets = Counter(getattr(e.cpu_parent, "name", "?") for e in prof.events() if e.name == "cudaMemsetAsync")
        result["memset_callers"] = dict(memsets.most_common(10))
    return result


def gemm_floor(spec, res: Resolution) -> dict:
    """GEMM shapes of one forward (from an eager pass), each timed as an FP8 GEMM, plus SDPA."""
    torch.manual_seed(0)
    model = spec.build("full", torch.bfloat16, "cuda")
    inputs = spec.inputs(model, res, torch.bfloat16, "cuda")
    shapes: Counter = Counter()
    attention: Counter = Counter()

    def record(module, args, _out):
        x = args[0]
        shapes[(x.numel() // x.shape[-1], module.in_features, module.out_features)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    original_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        q, k = (list(args) + [kwargs.get("query"), kwargs.get("key")])[:2] if len(args) >= 2 else (kwargs["query"], kwargs["key"])
        attention[(tuple(q.shape), tuple(k.shape))] += 1
        return original_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = recording_sdpa
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for h in hooks:
            h.remove()
    del model
    gc.collect()
    torch.cuda.empty_cache()

    # a device-to-device copy gives the memory bandwidth that bounds the GEMVs (M <= 8)
    big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_ms = cuda_time_ms(lambda: big.clone(), 3, 10)
    bandwidth = 2 * big.numel() / (copy_ms / 1e3)
    del big
    gemm_ms = gemv_ms = 0.0
    per_shape = []
    for (m, k, n), count in sorted(shapes.items()):
        if m <= 8:
            gemv_ms += (n * k + 2 * m * (k + n)) / bandwidth * 1e3 * count
            continue
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        tensor_ms = cuda_time_ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=True), 3, 20)
        row_ms = cuda_time_ms(lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=True), 3, 20)
        best = min(tensor_ms, row_ms)
        gemm_ms += best * count
        per_shape.append(
            dict(m=m, k=k, n=n, count=count, tensorwise_ms=round(tensor_ms, 4), rowwise_ms=round(row_ms, 4),
                 tflops=round(2 * m * k * n / best / 1e9, 1))
        )
    sdpa_ms = 0.0
    for (q_shape, k_shape), count in attention.items():
        q = torch.randn(q_shape, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(k_shape, device="cuda", dtype=torch.bfloat16)
        sdpa_ms += cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, k), 3, 20) * count
    return dict(
        gemm_ms=round(gemm_ms, 3), gemv_ms=round(gemv_ms, 3), sdpa_ms=round(sdpa_ms, 3),
        floor_ms=round(gemm_ms + gemv_ms + sdpa_ms, 3), bandwidth_tb_s=round(bandwidth / 1e12, 2), shapes=per_shape,
    )


def write_json(results: dict, path: str) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def run_rows(rows: str, run_row: Callable, row_type: type, results: dict, out: str, reference=None) -> None:
    """Runs each row, ``run_row(row, reference) -> (result, output)``, into ``results["rows"]``;
    the ``bf16_eager`` row's output is the reference of the rows after it. A failing row is
    reported and the others still run; the JSON is written after every row."""
    for row in rows.split(","):
        try:
            result, output = run_row(row, reference)
        except Exception as e:
            result, output = row_type(row, note=f"failed: {type(e).__name__}: {str(e)[:300]}"), None
        if row == "bf16_eager" and output is not None:
            reference = output
        results["rows"].append(asdict(result))
        print(json.dumps(asdict(result)), flush=True)
        write_json(results, out)


def run_in_child(model: str, row: str, options: list[str]) -> tuple[int, dict | None]:
    """This script on ``row`` alone, in a child process: its exit status and the row's results
    (None where it failed)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--model", model, "--rows", row, "--out", str(out), *options]
        status = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
        return status, json.loads(out.read_text())["rows"][0] if status == 0 and out.exists() else None


def run_isolated(args, results: dict) -> None:
    """Each row in a child process; the bf16_eager row's output, the reference of the error
    column, goes from its child to the next ones through a file."""
    with tempfile.TemporaryDirectory() as folder:
        options = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--profile", ",".join(args.profile),
                   "--reference", str(Path(folder) / "reference.pt")] + ["--host-calls"] * args.host_calls  # fmt: skip
        for row in args.rows.split(","):
            status, result = run_in_child(args.model, row, options)
            if result is None:
                result = asdict(Row(row, note=f"failed: child process exit status {status}"))
            results["rows"].append(result)
            print(json.dumps(result), flush=True)
            write_json(results, args.out)


def warm_compile_seconds(model: str, row: str) -> float:
    """Compile seconds of ``row`` in a fresh process that finds this one's caches (Inductor's
    FX graph and autotuning caches, under TORCHINDUCTOR_CACHE_DIR) filled."""
    status, result = run_in_child(model, row, ["--warmup", "0", "--iters", "1"])
    if result is None:
        raise RuntimeError(f"the warm compile of {row!r} failed: child process exit status {status}")
    return result["compile_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux", choices=sorted(RESOLUTIONS))
    parser.add_argument("--rows", default="bf16_eager,bf16_regional,omni_fp8_row,omni_fp8_tensor")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--profile", default="", help="comma-separated rows to profile")
    parser.add_argument("--host-calls", action="store_true", help="the profiled rows also list their costliest host calls")
    parser.add_argument("--warm-compile", default="", help="comma-separated rows to compile again in a second process")
    parser.add_argument("--isolate", action="store_true", help="each row in a process of its own")
    parser.add_argument("--reference", default="", help=argparse.SUPPRESS)  # a child's reference output file
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.profile = [r for r in args.profile.split(",") if r]

    spec = DITS[args.model]
    res = RESOLUTIONS[args.model]
    env = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"), model=spec.class_name,
        resolution=asdict(res),
    )
    with contextlib.suppress(ImportError):
        env["torchao"] = __import__("torchao").__version__
    print(json.dumps(env), flush=True)
    results = {"env": env, "rows": []}
    if args.floor:
        results["floor"] = gemm_floor(spec, res)
        print("floor", {k: v for k, v in results["floor"].items() if k != "shapes"}, flush=True)
    if args.isolate:
        run_isolated(args, results)
    else:
        reference_file = Path(args.reference) if args.reference else None
        reference = torch.load(reference_file) if reference_file and reference_file.exists() else None

        def run_and_keep(row, reference):
            result, output = run_row(row, spec, res, reference, args)
            if reference_file and row == "bf16_eager":
                torch.save(output, reference_file)
            return result, output

        run_rows(args.rows, run_and_keep, Row, results, args.out, reference)
    for row in results["rows"]:
        if row["name"] in args.warm_compile.split(","):
            row["warm_compile_s"] = warm_compile_seconds(args.model, row["name"])
            print(row["name"], "warm compile s", row["warm_compile_s"], flush=True)
    write_json(results, args.out)
    floor = results.get("floor", {}).get("floor_ms")
    print(f"\n{'row':34} {'ms':>8} {'loop ms':>8} {'compile s':>9} {'weights GB':>10} {'peak GB':>8} {'rel err':>8} {'% floor':>8}")
    for r in results["rows"]:
        pct = f"{r['ms'] / floor * 100:7.0f}%" if floor else ""
        print(f"{r['name']:34} {r['ms']:8.2f} {r.get('loop_ms', float('nan')):8.2f} {r['compile_s']:9.1f} {r['weight_gb']:10.2f} {r['peak_gb']:8.2f} {r['rel_err']:8.4f} {pct}")


if __name__ == "__main__":
    sys.exit(main())
