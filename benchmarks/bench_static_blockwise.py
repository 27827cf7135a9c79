"""GPU measurements for static activation scales, block-wise weights and FP8 checkpoint loading.

    python benchmarks/bench_static_blockwise.py --parts rows,kernels,gemm,load --out $OUT/static_blockwise.json

FLUX.1-dev shape (random weights, seed 0), 1024x1024, 512 text tokens, regional compile:

* ``rows``: ms per forward and relative error vs BF16 eager for BF16 compiled, dynamic FP8
  (per-row, per-tensor), static FP8 (per-tensor, per-row; scales calibrated on 3 other
  denoising inputs of the same model) and block-wise FP8 (128x128);
* ``kernels``: CUDA kernels per forward (torch.profiler) of BF16, dynamic per-tensor and static
  per-tensor: a static quantize fused into its producer adds no kernel over BF16 and no
  reduction (no kernel with ``amax`` in its name);
* ``gemm``: the FLUX GEMM shapes as BF16 mm, per-tensor ``_scaled_mm`` and the Triton
  block-scaled GEMM, each on operands quantized beforehand (TFLOP/s);
* ``load``: an FP8 checkpoint of the model loaded into a skeleton on the GPU; peak GPU memory
  during the load over the loaded weight bytes (target: <= 1.1).

Each part can run alone (``--parts``), so a run fits a 10-minute limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_dit  # noqa: E402  (the shared helpers of the DiT benchmark)
from bench_dit import RESOLUTIONS, Row, cuda_time_ms, first_output, weight_gb  # noqa: E402

import fp8_compile  # noqa: E402
from fp8_compile.blockwise import block_scaled_mm, quantize_activation_groups, quantize_weight_blocks  # noqa: E402
from fp8_compile.calibration import calibrate, zoo_runs  # noqa: E402
from fp8_compile.checkpoint import load_quantized, save_quantized, skeleton  # noqa: E402
from fp8_compile.ops import quantize_activation, quantize_weight  # noqa: E402
from fp8_compile.zoo import DITS  # noqa: E402

SPEC = DITS["flux"]
RES = RESOLUTIONS["flux"]
ROWS = {
    "bf16_regional": None,
    "fp8_dynamic_row": {"granularity": "per_row"},
    "fp8_dynamic_tensor": {"granularity": "per_tensor"},
    "fp8_static_tensor": {"granularity": "per_tensor", "activation_scheme": "static"},
    "fp8_static_row": {"granularity": "per_row", "activation_scheme": "static"},
    "fp8_block128": {"weight_block_size": [128, 128]},
}


def build():
    torch.manual_seed(0)
    model = SPEC.build("full", torch.bfloat16, "cuda")
    torch.manual_seed(1)
    return model, SPEC.inputs(model, RES, torch.bfloat16, "cuda")


def fresh_memory() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def calibrated_scales() -> dict[str, float]:
    model, _ = build()
    torch.manual_seed(123)  # calibration inputs differ from the evaluation inputs
    runs = zoo_runs(SPEC, model, 3, RES, torch.bfloat16, "cuda")
    scales = calibrate(model, runs).scales
    del model, runs
    fresh_memory()
    return scales


def prepared(row: str, scales: dict[str, float]):
    """The model of ``row``, converted and regionally compiled, and its inputs."""
    model, inputs = build()
    options = ROWS[row]
    if options is None:
        model.compile_repeated_blocks(fullgraph=True)
        return model, inputs
    if options.get("activation_scheme") == "static":
        options = {**options, "activation_scales": scales}
    fp8_compile.quantize_(model, options)  # converted once here; the backend then only compiles
    model.compile_repeated_blocks(fullgraph=True, backend="omni_fp8")
    return model, inputs


def run_rows(rows: list[str], scales: dict[str, float], args) -> list[dict]:
    model, inputs = build()
    with torch.no_grad():
        reference = first_output(model(**inputs))
    del model
    fresh_memory()
    results = []
    for row in rows:
        result = Row(row)
        try:
            start = time.perf_counter()
            model, inputs = prepared(row, scales)
            with torch.no_grad():
                for _ in range(2):
                    model(**inputs)
                torch.cuda.synchronize()
                result.compile_s = time.perf_counter() - start
                result.weight_gb = weight_gb(model)
                torch.cuda.reset_peak_memory_stats()
                result.ms = cuda_time_ms(lambda: model(**inputs), args.warmup, args.iters)
                result.peak_gb = torch.cuda.max_memory_allocated() / 1e9
                out = first_output(model(**inputs))
            result.rel_err = ((out - reference).norm() / reference.norm()).item()
            del model, inputs, out
        except Exception as e:  # a failing row is reported, the others still run
            result.note = f"failed: {type(e).__name__}: {str(e)[:300]}"
        fresh_memory()
        results.append(asdict(result))
        print(json.dumps(asdict(result)), flush=True)
    return results


def kernels_per_forward(rows: list[str], scales: dict[str, float]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for row in rows:
        model, inputs = prepared(row, scales)
        with torch.no_grad():
            for _ in range(3):
                model(**inputs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(**inputs)
                torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        categories = Counter(bench_dit.classify(n) for n in names)
        counts[row] = {
            "kernels": len(names),
            "amax_kernels": sum("amax" in n.lower() for n in names),
            "by_category": dict(categories),
        }
        print(row, json.dumps(counts[row]), flush=True)
        del model, inputs
        fresh_memory()
    return counts


def gemm_shapes(m: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the FLUX.1-dev single- and double-block GEMMs at ``m`` tokens."""
    return [(m, 3072, 3072), (m, 3072, 9216), (m, 3072, 12288), (m, 12288, 3072), (m, 15360, 3072)]


def gemm_speeds() -> list[dict]:
    m = (RES.height // 16) * (RES.width // 16) + RES.text_tokens
    results = []
    for m_, k, n in gemm_shapes(m):
        x = torch.randn(m_, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x_fp8, x_scale = quantize_activation(x, "per_tensor")
        w_fp8, w_scale = quantize_weight(w, "per_tensor")
        wb, wb_scale = quantize_weight_blocks(w, (128, 128))
        xb, xb_scale = quantize_activation_groups(x, 128)
        timings = {
            "bf16": cuda_time_ms(lambda: x @ w.T, 3, 20),
            "fp8_tensor": cuda_time_ms(
                lambda: torch._scaled_mm(x_fp8, w_fp8.t(), x_scale, w_scale, out_dtype=torch.bfloat16, use_fast_accum=True), 3, 20
            ),
            "fp8_block128": cuda_time_ms(
                lambda: block_scaled_mm(xb, xb_scale, wb, wb_scale, None, (128, 128), torch.bfloat16), 3, 20
            ),
        }
        row = {"m": m_, "k": k, "n": n, **{f"{name}_ms": round(t, 4) for name, t in timings.items()}}
        row.update({f"{name}_tflops": round(2 * m_ * k * n / t / 1e9, 1) for name, t in timings.items()})
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def checkpoint_load_memory(folder: str) -> dict:
    path = Path(folder) / "flux_fp8.safetensors"
    model, _ = build()
    fp8_compile.quantize_(model)
    save_quantized(model, path)
    del model
    fresh_memory()
    with skeleton():
        fresh = SPEC.build("full", torch.bfloat16, "cpu")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    load_quantized(fresh, path, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    loaded = sum(t.numel() * t.element_size() for t in [*fresh.parameters(), *fresh.buffers()] if t.is_cuda)
    peak = torch.cuda.max_memory_allocated() - before
    result = {
        "checkpoint_gb": round(path.stat().st_size / 1e9, 3),
        "loaded_weight_gb": round(loaded / 1e9, 3),
        "peak_gpu_gb_during_load": round(peak / 1e9, 3),
        "peak_over_weights": round(peak / loaded, 4),
        "load_s": round(seconds, 1),
        "target_met": peak <= 1.1 * loaded,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="rows,kernels,gemm,load")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--checkpoint-dir", default=os.environ.get("TMPDIR", tempfile.gettempdir()))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "static_blockwise.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    results: dict = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}}
    scales = calibrated_scales() if {"rows", "kernels"} & set(parts) else {}

    def save() -> None:
        Path(args.out).write_text(json.dumps(results, indent=1))

    if "rows" in parts:
        results["rows"] = run_rows(args.rows.split(","), scales, args)
        save()
    if "kernels" in parts:
        results["kernels"] = kernels_per_forward(["bf16_regional", "fp8_dynamic_tensor", "fp8_static_tensor"], scales)
        save()
    if "gemm" in parts:
        results["gemm"] = gemm_speeds()
        save()
    if "load" in parts:
        with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as folder:
            results["load"] = checkpoint_load_memory(folder)
        save()

    print(f"\n{'row':22} {'ms':>8} {'rel err':>8} {'weights GB':>10}")
    for r in results.get("rows", []):
        print(f"{r['name']:22} {r['ms']:8.2f} {r['rel_err']:8.4f} {r['weight_gb']:10.2f} {r['note']}")
    for row, c in results.get("kernels", {}).items():
        print(f"{row:22} {c['kernels']:5d} kernels/forward, {c['amax_kernels']} with amax")
    if "load" in results:
        print("checkpoint load:", results["load"])


if __name__ == "__main__":
    main()
