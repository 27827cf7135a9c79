"""omni_fp8 under diffusers context parallelism, on the CPU: two processes joined by gloo,
without and with FP8 attention.

diffusers' Ulysses attention shards the sequence over the ranks and exchanges heads with
all-to-all; its hooks split the inputs and gather the output. Each rank here compiles its own
tiny FLUX with omni_fp8 (converting its weights on the first call, as the one-line
``torch.compile`` does) and must get, at every step, what the same FP8 model gives in one
process without any parallelism. A single-process run cannot cover this: diffusers accepts
no context-parallel degree below 2 and none above the world size.
"""

import copy
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ContextParallelConfig
from diffusers.hooks import HookRegistry, ModelHook
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import fp8_compile
from fp8_compile import Decision, ScaledLinear, attention

from conftest import build, first_output, rel_error, unique_graphs

WORLD_SIZE = 2
# The first call converts the weights (and runs eagerly in FP8); the others run the compiled
# graph: new timestep values, the same shapes.
TIMESTEPS = (1.0, 0.9, 0.5, 0.1)
# Per-row scaling quantizes each token from its own row, so a rank holding half the tokens
# quantizes them exactly as one process does, and the attention sees every key either way.
# In float32, compiled and eager FP8 round alike (test_backend bounds them by 1e-3), so the
# one-process reference can run eagerly; 1e-3 is tighter than one bf16 rounding (2**-8). A
# scale taken over each rank's half of the tokens instead would be off by FP8 rounding, ~1e-2.
TOLERANCE = 1e-3
# enable_parallelism wraps the top-level proj_out in a gather hook, so the backend's implicit
# conversion keeps that layer BF16 (see the last test); the reference does the same.
REFERENCE_OPTIONS = {"ignored_layers": ["re:proj_out"]}


def _small_flux() -> tuple[nn.Module, dict]:
    """The float32 tiny FLUX with one block of each kind: both attention kinds, half the compile."""
    model, inputs = build("flux", dtype=torch.float32)
    model.transformer_blocks = model.transformer_blocks[:1]
    model.single_transformer_blocks = model.single_transformer_blocks[:1]
    return model, inputs


def _steps(inputs: dict) -> list[dict]:
    return [{**inputs, "timestep": torch.full_like(inputs["timestep"], t)} for t in TIMESTEPS]


def _fp8_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What QuantizeAttention puts in place of SDPA, callable eagerly (FLUX's calls are unmasked)."""
    return attention.fp8_attention(query, key, value, scale)


def _one_process_run(model: nn.Module, inputs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """A converted copy of ``model`` run eagerly without parallelism: its outputs with SDPA, with
    FP8 attention in place of SDPA, and its FP8 layer count."""
    reference = copy.deepcopy(model)
    report = fp8_compile.quantize_(reference, REFERENCE_OPTIONS)
    with torch.no_grad():
        outputs = [first_output(reference(**step)) for step in _steps(inputs)]
        with mock.patch.object(F, "scaled_dot_product_attention", _fp8_sdpa):
            fp8_attention_outputs = [first_output(reference(**step)) for step in _steps(inputs)]
    return outputs, fp8_attention_outputs, len(report.by_decision(Decision.FP8))


def _run_rank(rank: int, init_method: str, results: Path, fp8_attention: bool) -> None:
    """One rank: enable Ulysses attention, compile with omni_fp8, run the steps, save what it saw."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    # The ranks share the machine's cores: a pool of compile workers per rank only adds processes.
    torch._inductor.config.compile_threads = 1
    try:
        model, inputs = _small_flux()
        references, fp8_attention_references, reference_fp8_layers = _one_process_run(model, inputs)
        # diffusers 0.42.1 picks each rank's device as rank % torch.accelerator.device_count(),
        # which divides by zero on a machine without an accelerator.
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD_SIZE))
        compiled = torch.compile(model, backend="omni_fp8", options={"fp8_attention": fp8_attention})
        converting, first_compiled, *later = _steps(inputs)
        with torch.no_grad():
            outputs = [first_output(compiled(**converting))]
            weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, ScaledLinear)}
            counters.clear()
            out, (code,) = run_and_get_code(compiled, **first_compiled)
            outputs.append(first_output(out))
            outputs += [first_output(compiled(**step)) for step in later]
        report = fp8_compile.quantization_report(model)
        torch.save(
            {
                "outputs": outputs,
                "references": references,
                "fp8_attention_references": fp8_attention_references,
                "reference_fp8_layers": reference_fp8_layers,
                "graphs": unique_graphs(),
                "converted_once": all(model.get_submodule(n).weight is w for n, w in weights.items()),
                "fp8_layers": len(report.by_decision(Decision.FP8)),
                "scaled_mm_calls": code.count("_scaled_mm("),
                "packed_gemm_calls": code.count("fp8_compile.packed_fp8_matmul.default("),
                "all_to_all_calls": code.count("_c10d_functional.all_to_all_single.default("),
                "fp8_sdpa_calls": code.count("fp8_compile.fp8_sdpa.default("),
                "proj_out": next(layer.reason for layer in report.layers if layer.name == "proj_out"),
            },
            results / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fp8_attention", [False, True])
def test_fp8_under_ulysses_attention_matches_one_process(tmp_path, fp8_attention):
    """With ``fp8_attention`` the rank's attention runs cuDNN's op (the CPU reference here) on its
    half of the heads over all tokens, with per-tensor scales taken over those heads: Q, K, V
    round on other grid points than in one process, so that output may differ from the
    one-process FP8-attention output by about as much as FP8 attention moves it (0.0018 and
    0.0020 measured), and is bounded by twice that. The first call converts the weights and runs
    eagerly, with SDPA, as without the option."""
    args = (f"file://{tmp_path / 'rendezvous'}", tmp_path, fp8_attention)
    mp.spawn(_run_rank, args=args, nprocs=WORLD_SIZE)

    for rank in range(WORLD_SIZE):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen["graphs"] == 1, f"rank {rank} compiled {seen['graphs']} graphs over {len(TIMESTEPS) - 1} steps"
        assert seen["converted_once"]
        n_fp8 = seen["fp8_layers"]
        assert n_fp8 == seen["reference_fp8_layers"] > 0 and "hook" in seen["proj_out"]
        # One compiled graph holds the FP8 GEMMs and the Ulysses exchanges: q, k, v and the
        # attention output of each of the two attentions. Layers that read one activation share
        # a GEMM: q/k/v of the double block's image and text streams, q/k/v + proj_mlp of the
        # single block.
        assert seen["packed_gemm_calls"] == 3
        assert seen["scaled_mm_calls"] == n_fp8 - 3 - 3 - 4
        assert seen["all_to_all_calls"] == 2 * 4
        assert seen["fp8_sdpa_calls"] == (2 if fp8_attention else 0)
        steps = zip(seen["outputs"], seen["references"], seen["fp8_attention_references"])
        for step, (out, ref, fp8_attention_ref) in enumerate(steps):
            assert out.shape == ref.shape
            if fp8_attention and step > 0:
                bound = 2 * rel_error(fp8_attention_ref, ref)
                assert rel_error(out, fp8_attention_ref) <= bound, f"rank {rank}, step {step}"
            else:
                assert rel_error(out, ref) <= TOLERANCE, f"rank {rank}, step {step}"


def test_linear_wrapped_by_a_hook_before_conversion_stays_bf16():
    """diffusers' hooks capture the bound nn.Linear.forward: converted after that, the layer
    would run nn.Linear's code on an FP8 weight. Converted before, the hook wraps the FP8 layer."""
    reference = nn.Linear(64, 64).to(torch.bfloat16)
    hooked_late, hooked_early = copy.deepcopy(reference), copy.deepcopy(reference)
    HookRegistry.check_if_exists_or_initialize(hooked_late).register_hook(ModelHook(), "gather")
    report = fp8_compile.quantize_(hooked_late)
    fp8_compile.quantize_(hooked_early)
    HookRegistry.check_if_exists_or_initialize(hooked_early).register_hook(ModelHook(), "gather")

    assert report.layers[0].decision is Decision.BF16 and "hook" in report.layers[0].reason
    assert isinstance(hooked_early, ScaledLinear)
    x = torch.randn(8, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hooked_late(x), reference(x))
        # The hook wraps the FP8 forward: the same output as the FP8 layer called past the hook,
        # off BF16 by e4m3 rounding of weight and activation (measured 0.034-0.037 over seeds).
        early = hooked_early(x)
        assert torch.equal(early, ScaledLinear.forward(hooked_early, x))
        assert 0.01 < rel_error(early, reference(x)) < 0.1
