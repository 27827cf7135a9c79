"""Step caches with omni_fp8: time per generation of a FLUX.1-dev-shape transformer (random weights).

    source benchmarks/device_setup.sh       # the project wheel in .whl must include fp8_compile.caching
    python3 benchmarks/bench_cache.py --out $OUT/cache.json

Rows, all in one process on the same model (seed 0) and the same starting noise (seed 1):

    bf16               BF16 + Inductor
    omni_fp8           fp8_compile.quantize_ + omni_fp8
    omni_fp8_tea0.2    + TeaCache, rel_l1_thresh 0.2
    omni_fp8_tea0.4    + TeaCache, rel_l1_thresh 0.4
    omni_fp8_fbc       + diffusers' FirstBlockCache, threshold --fbc-threshold

Every row compiles the same way (regional, ``compile_repeated_blocks``, by default; ``--compile
whole``), without fullgraph since caches break the graph at the block boundary. One warm-up
generation compiles; then ``--repeats`` generations of ``--steps`` steps (1024x1024: 4096 image
+ 512 text tokens, batch 1, guidance 3.5, no CFG, as FLUX.1-dev) are timed end to end; the
median is reported with the speedup against BF16 and against omni_fp8 without cache, the steps
computed and the skip pattern (C computed, - skipped), the graphs compiled after the warm-up
(should be 0) and the relative difference of the final latents from the omni_fp8 row. On random
weights the skip pattern and the time are what can be judged; the quality of skipping cannot.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import fp8_compile
from fp8_compile.caching import apply_cache, reset_cache, teacache_pattern
from fp8_compile.caching.loop import generate
from fp8_compile.zoo import DITS, Resolution

NAME = "flux"
RESOLUTIONS = {"full": Resolution(1024, 1024, text_tokens=512), "tiny": Resolution(128, 128, text_tokens=16)}
ROWS = ["bf16", "omni_fp8", "omni_fp8_tea0.2", "omni_fp8_tea0.4", "omni_fp8_fbc"]


@dataclass
class Row:
    name: str
    ms_per_generation: float = float("nan")
    speedup_vs_bf16: float = float("nan")
    speedup_vs_omni_fp8: float = float("nan")
    steps_computed: int = 0
    pattern: str = ""
    warmup_s: float = float("nan")
    graphs: int = 0  # compiled by the end of the warm-up generation
    graphs_after_warmup: int = 0
    peak_gb: float = float("nan")
    latents_vs_omni_fp8: float = float("nan")
    note: str = ""
    times_ms: list[float] = field(default_factory=list)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cache_of(row: str, fbc_threshold: float) -> tuple[str, dict] | None:
    if "_tea" in row:
        return "tea_cache", {"rel_l1_thresh": float(row.split("_tea")[1])}
    if row.endswith("_fbc"):
        return "first_block_cache", {"threshold": fbc_threshold}
    return None


def fbc_pattern_probe(model: nn.Module) -> Callable[[], str]:
    """Reads, after a step, whether FirstBlockCache computed it (from diffusers' hook state)."""
    head = model.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    return lambda: "C" if head.state_manager._state_cache["cond"].should_compute else "-"


def prepare(row: str, args: argparse.Namespace) -> tuple[nn.Module, nn.Module, str]:
    """The model (for caches and patterns), the callable to run and a note."""
    spec = DITS[NAME]
    torch.manual_seed(0)
    model = spec.build(args.size, torch.bfloat16, args.device)
    backend = "inductor"
    if row.startswith("omni_fp8"):
        fp8_compile.quantize_(model)
        backend = "omni_fp8"
    cache = cache_of(row, args.fbc_threshold)
    if cache is not None:
        apply_cache(model, *cache)
    if args.compile == "regional":
        model.compile_repeated_blocks(backend=backend)
        return model, model, f"regional backend={backend} cache={cache}"
    return model, torch.compile(model, backend=backend), f"whole backend={backend} cache={cache}"


def run_row(row: str, args: argparse.Namespace) -> tuple[Row, torch.Tensor]:
    torch._dynamo.reset()
    counters.clear()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    result = Row(row)
    model, runner, result.note = prepare(row, args)
    torch.manual_seed(1)
    inputs = DITS[NAME].inputs(model, RESOLUTIONS[args.size], torch.bfloat16, args.device)
    cache = cache_of(row, args.fbc_threshold)
    fbc_steps: list[str] = []
    on_step = None
    if row.endswith("_fbc"):
        probe = fbc_pattern_probe(model)
        on_step = lambda step: fbc_steps.append(probe())  # noqa: E731

    def generation() -> tuple[torch.Tensor, str]:
        fbc_steps.clear()
        latents = generate(runner, NAME, inputs, args.steps, on_step=on_step)
        synchronize(args.device)
        if cache is None:
            return latents, "C" * args.steps
        pattern = teacache_pattern(model)["cond"] if cache[0] == "tea_cache" else "".join(fbc_steps)
        reset_cache(model)  # as pipelines do at the end of a generation
        return latents, pattern

    with torch.no_grad():
        start = time.perf_counter()
        generation()
        result.warmup_s = time.perf_counter() - start
        result.graphs = counters["stats"]["unique_graphs"]
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats):
            start = time.perf_counter()
            latents, result.pattern = generation()
            result.times_ms.append((time.perf_counter() - start) * 1e3)
    result.ms_per_generation = statistics.median(result.times_ms)
    result.steps_computed = result.pattern.count("C")
    result.graphs_after_warmup = counters["stats"]["unique_graphs"] - result.graphs
    if args.device == "cuda":
        result.peak_gb = torch.cuda.max_memory_allocated() / 1e9
    return result, latents.float()


def environment(args: argparse.Namespace) -> dict:
    import diffusers

    env = dict(torch=torch.__version__, diffusers=diffusers.__version__, date=time.strftime("%Y-%m-%d"),
               model=DITS[NAME].class_name, size=args.size, resolution=asdict(RESOLUTIONS[args.size]),
               steps=args.steps, repeats=args.repeats, compile=args.compile, fbc_threshold=args.fbc_threshold)
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=__import__("triton").__version__)
    return env


def compare(rows: list[dict], final_latents: dict[str, torch.Tensor]) -> None:
    """Fill in each row's speedups and its final latents' distance from the rows measured so far."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        for baseline, key in (("bf16", "speedup_vs_bf16"), ("omni_fp8", "speedup_vs_omni_fp8")):
            if baseline in by_name:
                r[key] = by_name[baseline]["ms_per_generation"] / r["ms_per_generation"]
        if "omni_fp8" in final_latents and r["name"] in final_latents:
            reference = final_latents["omni_fp8"]
            r["latents_vs_omni_fp8"] = ((final_latents[r["name"]] - reference).norm() / reference.norm()).item()


def print_table(rows: list[dict]) -> None:
    columns = ["row", "ms / generation", "vs BF16", "vs omni_fp8", "steps computed", "pattern", "warm-up s",
               "graphs after warm-up", "latents vs omni_fp8"]
    print("\n| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for r in rows:
        print(f"| {r['name']} | {r['ms_per_generation']:.0f} | {r['speedup_vs_bf16']:.2f}x "
              f"| {r['speedup_vs_omni_fp8']:.2f}x "
              f"| {r['steps_computed']} | `{r['pattern']}` | {r['warmup_s']:.1f} | {r['graphs_after_warmup']} "
              f"| {r['latents_vs_omni_fp8']:.4f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", choices=["regional", "whole"], default="regional")
    parser.add_argument("--fbc-threshold", type=float, default=0.08,
                        help="FirstBlockCacheConfig threshold (0.08: ParaAttention's FLUX default, diffusers docs)")
    parser.add_argument("--size", choices=sorted(RESOLUTIONS), default="full", help="tiny: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    results = {"env": environment(args), "rows": []}
    print(json.dumps(results["env"]), flush=True)
    final_latents: dict[str, torch.Tensor] = {}
    for row in args.rows.split(","):
        try:
            result, final_latents[row] = run_row(row, args)
        except Exception as e:  # a failing row is reported, the others still run
            result = Row(row, note=f"failed: {type(e).__name__}: {str(e)[:300]}")
        results["rows"].append(asdict(result))
        print(json.dumps(asdict(result)), flush=True)
        compare(results["rows"], final_latents)
        if args.out:  # after every row, so that a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print_table(results["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
