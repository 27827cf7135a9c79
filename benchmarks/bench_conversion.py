"""What converting a full-size denoiser to FP8 costs: seconds, and GPU memory beyond the BF16 model.

    source benchmarks/device_setup.sh
    python3 benchmarks/bench_conversion.py --models flux,wan,qwen_image,z_image --out $OUT/conversion.json

Each model is built on the GPU in BF16 with random weights, then ``fp8_compile.quantize_``
converts it in place. Reported per model: BF16 and FP8 weight GB, conversion seconds, and the
peak of allocated GPU memory during conversion minus the BF16 model's (the benchmark issue's
budget is 1 GB: the conversion goes layer by layer and chunk by chunk, and frees each BF16
weight as soon as its FP8 copy exists).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

import fp8_compile
from bench_dit import weight_gb, write_json
from fp8_compile.zoo import DITS


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model = DITS[name].build("full", torch.bfloat16, "cuda")
    bf16_gb = weight_gb(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = fp8_compile.quantize_(model)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = dict(
        model=DITS[name].class_name,
        bf16_weight_gb=round(bf16_gb, 3),
        fp8_weight_gb=round(weight_gb(model), 3),
        convert_s=round(seconds, 2),
        peak_over_bf16_gb=round((torch.cuda.max_memory_allocated() - before) / 1e9, 3),
        layers=report.summary(),
    )
    del model, report
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux,wan,qwen_image,z_image", help=f"comma-separated, from {sorted(DITS)}")
    parser.add_argument("--out", default="", help="JSON file to write")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": []}
    for name in args.models.split(","):
        results["rows"].append({"name": name, **measure(name)})
        print(json.dumps(results["rows"][-1]), flush=True)
        write_json(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
