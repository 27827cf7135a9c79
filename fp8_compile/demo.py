"""The built-in demo: a small FLUX-architecture transformer compiled with omni_fp8.

    python -m fp8_compile.demo [--model flux] [--device cpu|cuda] [--height 256 --width 256]

Builds the model with random weights (no download), runs it in BF16, compiles a copy with
``backend="omni_fp8"``, and prints the quantization report, the error against BF16, the weight
memory and the time per forward.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

from fp8_compile.report import quantization_report
from fp8_compile.zoo import DITS, Resolution, first_output


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _time_forward(model, inputs, device: torch.device, repeats: int) -> float:
    """Median seconds per forward (CUDA events on a GPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux", choices=sorted(DITS), help="architecture (tiny config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--ignored-layers", default="", help="comma-separated ignore patterns, e.g. 'ff,proj_out'")
    parser.add_argument("--granularity", default="per_row", choices=["per_row", "per_tensor"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device)
    spec = DITS[args.model]
    torch.manual_seed(0)
    model = spec.build("tiny", torch.bfloat16, device)
    inputs = spec.inputs(model, Resolution(args.height, args.width), torch.bfloat16, device)
    options = {
        "ignored_layers": [p for p in args.ignored_layers.split(",") if p],
        "granularity": args.granularity,
    }

    with torch.no_grad():
        reference = first_output(model(**inputs))
        bf16_bytes = _weight_bytes(model)
        bf16_time = _time_forward(model, inputs, device, args.repeats)

        fp8_model = copy.deepcopy(model)
        compiled = torch.compile(fp8_model, backend="omni_fp8", options=options)
        start = time.perf_counter()
        for _ in range(2):  # the first call converts the weights, the second compiles the FP8 graph
            compiled(**inputs)
        compile_seconds = time.perf_counter() - start
        output = first_output(compiled(**inputs))
        fp8_time = _time_forward(compiled, inputs, device, args.repeats)

    report = quantization_report(fp8_model)
    error = ((output - reference).norm() / reference.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0).item()
    print(f"\n{spec.class_name} (tiny config, random weights) on {device}, {args.height}x{args.width}")
    print(f"report:        {report.summary()}")
    print(f"error vs BF16: relative {error:.4f}, cosine {cosine:.5f}")
    print(f"weights:       {bf16_bytes / 2**20:.2f} MiB BF16 -> {_weight_bytes(fp8_model) / 2**20:.2f} MiB FP8")
    print(f"time:          BF16 eager {bf16_time * 1e3:.2f} ms, omni_fp8 {fp8_time * 1e3:.2f} ms per forward "
          f"(compile {compile_seconds:.1f} s)")


if __name__ == "__main__":
    main()
