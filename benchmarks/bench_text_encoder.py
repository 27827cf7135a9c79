"""A T5-XXL-size text encoder (FLUX.1's, random weights) on one GPU: BF16 compiled vs omni_fp8.

    python benchmarks/bench_text_encoder.py --out $OUT/text_encoder.json

T5EncoderModel with T5-XXL's shape (24 layers, d_model 4096, d_ff 10240, 64 heads x 64, gated
GELU), batch 1 x 512 tokens, BF16 inputs. Rows, each on a freshly built model (same seed):
``bf16_eager`` (the reference), ``bf16_compiled`` (torch.compile, Inductor) and ``omni_fp8``
(fp8_compile.quantize_ then torch.compile(backend="omni_fp8"); T5's ``DenseReluDense.wo`` stays
BF16, see config.DTYPE_READ_LAYERS). Columns: ms per forward (median of CUDA-event timings
after warm-up), cold compile seconds, weight GB, peak GB during the timed forwards, and the
relative error and cosine of the last hidden state against BF16 eager.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import fp8_compile
from bench_dit import cuda_time_ms, run_rows, weight_gb

T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
)


@dataclass
class Row:
    name: str
    ms: float = float("nan")
    compile_s: float = float("nan")
    weight_gb: float = float("nan")
    peak_gb: float = float("nan")
    rel_err: float = float("nan")
    cosine: float = float("nan")
    report: str = ""
    note: str = ""


def build_encoder(layers: int) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": layers}))
    return model.to(torch.bfloat16).eval()


def prepare(row: str, model: nn.Module) -> nn.Module:
    if row == "bf16_eager":
        return model
    if row == "bf16_compiled":
        return torch.compile(model)
    if row == "omni_fp8":
        fp8_compile.quantize_(model)
        return torch.compile(model, backend="omni_fp8")
    raise SystemExit(f"unknown row {row!r}; rows: bf16_eager, bf16_compiled, omni_fp8")


def run_row(row: str, inputs: dict, reference: torch.Tensor | None, args) -> tuple[Row, torch.Tensor]:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    model = build_encoder(args.layers)
    result = Row(row)
    with torch.no_grad():
        start = time.perf_counter()
        runner = prepare(row, model)
        for _ in range(2):  # compiled by the end of the second call
            runner(**inputs)
        torch.cuda.synchronize()
        result.compile_s = time.perf_counter() - start if row != "bf16_eager" else 0.0
        result.weight_gb = weight_gb(model)
        torch.cuda.reset_peak_memory_stats()
        result.ms = cuda_time_ms(lambda: runner(**inputs), args.warmup, args.iters)
        result.peak_gb = torch.cuda.max_memory_allocated() / 1e9
        out = runner(**inputs).last_hidden_state.float()
    if reference is not None:
        result.rel_err = ((out - reference).norm() / reference.norm()).item()
        result.cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
    report = fp8_compile.quantization_report(model)
    result.report = report.summary() if report is not None else ""
    del model, runner
    return result, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="bf16_eager,bf16_compiled,omni_fp8")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="", help="JSON file to write")
    args = parser.parse_args()

    env = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        triton=__import__("triton").__version__, transformers=__import__("transformers").__version__,
        date=time.strftime("%Y-%m-%d"), model="T5EncoderModel", config={**T5_XXL, "num_layers": args.layers},
        tokens=args.tokens,
    )
    print(json.dumps(env), flush=True)
    torch.manual_seed(1)
    inputs = dict(
        input_ids=torch.randint(0, T5_XXL["vocab_size"], (1, args.tokens), device="cuda"),
        attention_mask=torch.ones(1, args.tokens, dtype=torch.long, device="cuda"),
    )
    results = {"env": env, "rows": []}
    run_rows(args.rows, lambda row, reference: run_row(row, inputs, reference, args), Row, results, args.out)
    print(f"\n{'row':16} {'ms':>8} {'compile s':>9} {'weights GB':>10} {'peak GB':>8} {'rel err':>8} {'cosine':>8}")
    for r in results["rows"]:
        print(f"{r['name']:16} {r['ms']:8.2f} {r['compile_s']:9.1f} {r['weight_gb']:10.2f} {r['peak_gb']:8.2f} "
              f"{r['rel_err']:8.4f} {r['cosine']:8.5f} {r['note']}")


if __name__ == "__main__":
    sys.exit(main())
