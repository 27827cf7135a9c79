"""omni_fp8 under diffusers context parallelism: BF16 compiled vs omni_fp8, one GPU vs two.

    source benchmarks/device_setup.sh
    python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_context_parallel.py \
        --model flux --out $OUT/context_parallel.json

(``python3 -m torch.distributed.run`` rather than ``torchrun`` so that PYTHONPATH is honoured.)
Full-size transformer, random weights from one seed, bf16, regional compile. The one-GPU rows
run on rank 0 while the other ranks wait; the others shard the sequence over every rank. Each
row reports ms per forward (median of CUDA-event timings; for several GPUs the slowest rank),
cold compile seconds (conversion, sharding and the first two calls), weight and peak GB per
GPU, and the graphs compiled before and after the timed steps (which cycle through new
timestep values, so any recompile shows). The output of each several-GPU row is compared with
its one-GPU row: it should agree within bf16 rounding (2**-8 relative). The NCCL environment
(NVLink multicast off) is used as the machine sets it and recorded in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import diffusers
import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers import ContextParallelConfig
from torch._dynamo.utils import counters

import fp8_compile
from bench_dit import RESOLUTIONS, cuda_time_ms, first_output, profile_breakdown, weight_gb
from fp8_compile.zoo import DITS

BF16_ROUNDING = 2**-8
MODELS = ("flux", "wan")
TIMESTEP_SCALE = {"flux": 1.0, "wan": 1000.0}  # the model's timestep at sigma = 1
TIMED_SIGMAS = (0.9, 0.7, 0.5, 0.3)
# The config entries that set the number of blocks, for --depth.
DEPTH_KEYS = {"flux": ("num_layers", "num_single_layers"), "wan": ("num_layers",)}
# Ring attention merges partial results by their log-sum-exp, which diffusers' default
# (native SDPA) backend cannot return.
RING_ATTENTION_BACKEND = "_native_cudnn"
# NVLink multicast stays off on the shared machines; recorded, never changed.
NCCL_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


@dataclass(frozen=True)
class Setup:
    name: str
    fp8: bool
    gpus: int  # 1, or every rank of the job
    attention: str = ""  # "ulysses" or "ring" when sharded
    cudagraphs: bool = False  # each compiled block replayed as a CUDA graph


@dataclass
class Result:
    name: str
    gpus: int
    ms: float = float("nan")
    compile_s: float = float("nan")
    weight_gb: float = float("nan")
    peak_gb: float = float("nan")
    graphs_compiled: int = 0
    graphs_after_steps: int = 0
    graph_breaks: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)


def setups(world: int) -> list[Setup]:
    return [
        Setup("bf16_1gpu", fp8=False, gpus=1),
        Setup("omni_fp8_1gpu", fp8=True, gpus=1),
        Setup(f"bf16_{world}gpu_ulysses", fp8=False, gpus=world, attention="ulysses"),
        Setup(f"omni_fp8_{world}gpu_ulysses", fp8=True, gpus=world, attention="ulysses"),
        Setup(f"omni_fp8_{world}gpu_ring", fp8=True, gpus=world, attention="ring"),
        Setup(f"bf16_{world}gpu_ulysses_cudagraphs", fp8=False, gpus=world, attention="ulysses", cudagraphs=True),
        Setup(f"omni_fp8_{world}gpu_ulysses_cudagraphs", fp8=True, gpus=world, attention="ulysses", cudagraphs=True),
    ]


def init_distributed() -> torch.device:
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    # A rank that waits out a one-GPU row or a failing row must not wait forever.
    dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=6))
    return device


def same_on_every_rank(tensors) -> None:
    """Seeded construction already gives every rank the same values; this makes sure of it."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            dist.broadcast(tensor, src=0)


def build(args: argparse.Namespace, device: torch.device, shared: bool) -> tuple[nn.Module, dict]:
    """The BF16 model and its inputs, identical on every rank when ``shared``."""
    spec = DITS[args.model]
    torch.manual_seed(0)
    depth = {key: args.depth for key in DEPTH_KEYS[args.model]} if args.depth else {}
    model = spec.build("full", torch.bfloat16, device, **depth)
    torch.manual_seed(1)
    inputs = spec.inputs(model, RESOLUTIONS[args.model], torch.bfloat16, device)
    if shared:
        same_on_every_rank(itertools.chain(model.parameters(), model.buffers(), inputs.values()))
    return model, inputs


def prepare(setup: Setup, model: nn.Module) -> None:
    """Convert (FP8 rows), shard (several-GPU rows) and compile, in that order."""
    options = {"cudagraphs": True} if setup.cudagraphs else {}
    if setup.fp8:
        fp8_compile.quantize_(model, options)  # before enable_parallelism, which hooks proj_out
    if setup.attention == "ring":
        model.set_attention_backend(RING_ATTENTION_BACKEND)
    if setup.attention:
        degree = {f"{setup.attention}_degree": setup.gpus}
        model.enable_parallelism(config=ContextParallelConfig(**degree))
    if setup.fp8:
        model.compile_repeated_blocks(backend="omni_fp8", options=options)
    else:
        model.compile_repeated_blocks(backend="inductor", mode="reduce-overhead" if setup.cudagraphs else None)
    if setup.cudagraphs:
        fp8_compile.mark_cudagraph_steps(model)  # one CUDA-graph generation per forward


def slowest(value: float) -> float:
    """The largest of every rank's ``value``."""
    tensor = torch.tensor(value, device="cuda", dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def measure(setup: Setup, args: argparse.Namespace, device: torch.device) -> tuple[Result, torch.Tensor]:
    """One row on this rank; returns its result and the output for the fixed inputs (on the CPU)."""
    torch._dynamo.reset()
    counters.clear()
    gc.collect()
    torch.cuda.empty_cache()
    result = Result(setup.name, setup.gpus)
    with torch.no_grad():
        model, inputs = build(args, device, shared=setup.gpus > 1)
        start = time.perf_counter()
        prepare(setup, model)
        for _ in range(2):  # compiled by the end of the second call
            model(**inputs)
        torch.cuda.synchronize()
        result.compile_s = time.perf_counter() - start
        result.graphs_compiled = counters["stats"]["unique_graphs"]
        torch.cuda.reset_peak_memory_stats()
        steps = itertools.cycle(
            [{**inputs, "timestep": torch.full_like(inputs["timestep"], s * TIMESTEP_SCALE[args.model])} for s in TIMED_SIGMAS]
        )
        result.ms = cuda_time_ms(lambda: model(**next(steps)), args.warmup, args.iters)
        result.graphs_after_steps = counters["stats"]["unique_graphs"]
        result.graph_breaks = sum(counters["graph_break"].values())
        # Time for the call to return with an empty launch queue: near result.ms, the GPU waits on the host.
        start = time.perf_counter()
        model(**inputs)
        result.extra["host_ms"] = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        result.weight_gb = weight_gb(model)
        result.peak_gb = torch.cuda.max_memory_allocated() / 1e9
        out = first_output(model(**inputs)).cpu()
        if setup.name in args.profile.split(","):
            result.extra["breakdown_ms"] = profile_breakdown(lambda: model(**inputs), host_calls=True)
    if setup.gpus > 1:
        result.ms, result.compile_s, result.peak_gb = (slowest(v) for v in (result.ms, result.compile_s, result.peak_gb))
    del model, inputs
    return result, out


def rel_error(out: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if out is None or ref is None:
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def agreement(outputs: dict[str, torch.Tensor], world: int) -> dict[str, dict]:
    """Each several-GPU output against its one-GPU row, and FP8 against BF16 on one GPU."""
    pairs = {
        f"omni_fp8_{world}gpu_ulysses": "omni_fp8_1gpu",
        f"omni_fp8_{world}gpu_ring": "omni_fp8_1gpu",
        f"omni_fp8_{world}gpu_ulysses_cudagraphs": "omni_fp8_1gpu",
        f"bf16_{world}gpu_ulysses": "bf16_1gpu",
        f"bf16_{world}gpu_ulysses_cudagraphs": "bf16_1gpu",
    }
    checks = {}
    for row, reference in pairs.items():
        error = rel_error(outputs.get(row), outputs.get(reference))
        checks[f"{row} vs {reference}"] = {"rel_err": error, "bound": BF16_ROUNDING, "within": error <= BF16_ROUNDING}
    # FP8 rounding turns the BF16-level differences of a sharded run (other GEMM shapes, attention
    # split across ranks) into whole FP8 steps, so the several-GPU FP8 output is also judged by
    # its error against BF16, which should equal the one-GPU FP8 row's.
    for row in (
        "omni_fp8_1gpu",
        f"omni_fp8_{world}gpu_ulysses",
        f"omni_fp8_{world}gpu_ring",
        f"omni_fp8_{world}gpu_ulysses_cudagraphs",
    ):
        checks[f"{row} vs bf16_1gpu"] = {"rel_err": rel_error(outputs.get(row), outputs.get("bf16_1gpu"))}
    return checks


def environment(args: argparse.Namespace, world: int) -> dict:
    return dict(
        gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        world_size=world, torch=torch.__version__, cuda=torch.version.cuda,
        triton=__import__("triton").__version__, diffusers=diffusers.__version__,
        date=time.strftime("%Y-%m-%d"), model=DITS[args.model].class_name,
        resolution=asdict(RESOLUTIONS[args.model]), compile="regional (compile_repeated_blocks)",
        nccl_env={name: os.environ.get(name) for name in NCCL_ENV},
        blocks_kept=args.depth or "all",
    )


def print_summary(results: dict) -> None:
    rows = results["rows"]
    base = next((r["ms"] for r in rows if r["name"] == "bf16_1gpu"), float("nan"))
    print(f"\n{'row':26} {'ms':>8} {'vs bf16 1gpu':>12} {'compile s':>9} {'GB/gpu':>7} {'peak GB':>8} {'graphs':>6} {'+steps':>6}")
    for r in rows:
        if r["error"]:
            print(f"{r['name']:26} failed: {r['error'][:120]}")
            continue
        print(
            f"{r['name']:26} {r['ms']:8.2f} {base / r['ms']:11.2f}x {r['compile_s']:9.1f} {r['weight_gb']:7.2f} "
            f"{r['peak_gb']:8.2f} {r['graphs_compiled']:6d} {r['graphs_after_steps'] - r['graphs_compiled']:6d}"
        )
    for name, check in results["agreement"].items():
        if math.isnan(check["rel_err"]):
            print(f"{name}: not measured")
            continue
        verdict = "" if "within" not in check else f" (bf16 rounding {BF16_ROUNDING:.4f}: {'yes' if check['within'] else 'NO'})"
        print(f"{name}: rel err {check['rel_err']:.5f}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux", choices=MODELS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--depth", type=int, default=0, help="keep only this many blocks of each kind (0: all), to compare outputs block by block")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--profile", default="", help="comma-separated rows to break down with torch.profiler (rank 0's GPU time)")
    parser.add_argument("--out", required=True, help="JSON file to write (under $OUT on the GPU machine)")
    args = parser.parse_args()

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"env": environment(args, world), "rows": []}
    outputs: dict[str, torch.Tensor] = {}
    try:
        for setup in setups(world):
            if args.rows and setup.name not in args.rows.split(","):
                continue
            if rank < setup.gpus:
                try:
                    result, outputs[setup.name] = measure(setup, args, device)
                except Exception as e:  # reported; the other rows still run
                    result = Result(setup.name, setup.gpus, error=f"{type(e).__name__}: {str(e)[:400]}")
                results["rows"].append(asdict(result))
                if rank == 0:
                    print(json.dumps(asdict(result)), flush=True)
            dist.barrier()
        if rank == 0:
            results["agreement"] = agreement(outputs, world)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            print_summary(results)
    finally:
        # A run whose last row held CUDA graphs (with NCCL work captured) once hung at exit; with
        # the graphs freed first, every later run closed its process group cleanly.
        torch._dynamo.reset()
        torch.cuda.synchronize()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
