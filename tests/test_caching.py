"""Step caches (TeaCache and diffusers' own) on tiny random-weight denoisers, alone and with omni_fp8.

Tolerances: a skipped step computes ``stack_input + (stack_output - stack_input)`` in BF16 where a
computed one produces ``stack_output`` directly; the two differ by BF16 rounding of the residual
add (2**-8 relative per element), so outputs agree to ~1e-3 (measured: <= 1.3e-3) and we allow
5e-3. A residual from the wrong step, branch or stream, or no residual at all, changes the
output by the step's whole update: 5% and more on these models.
"""

import copy
import json
import logging
import re

import pytest
import torch
import torch.nn as nn
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from torch._dynamo.convert_frame import FRAME_COMPILE_COUNTER
from torch._dynamo.utils import counters

import fp8_compile
from fp8_compile.caching import apply_cache, parse_cache_config, reset_cache, teacache_pattern
from fp8_compile.caching.fit import TeaCacheRecorder, fit_coefficients, main as fit_main
from fp8_compile.caching.loop import CONVENTIONS, generate, prediction
from fp8_compile.caching.specs import teacache_model_of
from fp8_compile.caching.teacache import teacache_state

from conftest import build, rel_error, unique_graphs

MODELS = ["flux", "flux2_klein", "qwen_image", "wan", "z_image", "hunyuan_video15", "glm_image"]
ROUNDING = 5e-3  # see the module docstring
# Skip every step TeaCache may skip, and let no generation end within the test.
SKIP_ALL = {"rel_l1_thresh": 1e6, "warmup_steps": 1, "num_inference_steps": 1000}


class TinyPipeline(DiffusionPipeline):
    """A pipeline with only a denoiser and a scheduler: what apply_cache reads from a pipeline."""

    def __init__(self, transformer: nn.Module, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)


def run_at(model, name, inputs, timestep_scale: float = 1.0) -> torch.Tensor:
    conventions = CONVENTIONS[name]
    with torch.no_grad():
        return prediction(model(**{**inputs, conventions.timestep: inputs[conventions.timestep] * timestep_scale}))


def compile_counts() -> tuple[int, int, int]:
    """Graphs compiled, graph breaks met, and frames traced by Dynamo (a recompile without a graph counts)."""
    return unique_graphs(), sum(counters["graph_break"].values()), sum(FRAME_COMPILE_COUNTER.values())


# --- TeaCache on every denoiser in scope ---------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_skipped_step_reuses_the_stack_residual(name):
    model, inputs = build(name)
    apply_cache(model, "tea_cache", SKIP_ALL)
    computed, skipped = run_at(model, name, inputs), run_at(model, name, inputs)
    assert teacache_pattern(model) == {"default": "C-"}
    assert rel_error(skipped, computed) < ROUNDING


# Z-Image's stack input comes out of timestep-modulated refiner layers; the others' does not.
@pytest.mark.parametrize("name", [n for n in MODELS if n != "z_image"])
def test_skipped_step_runs_the_output_layers_at_the_current_timestep(name):
    model, inputs = build(name)
    uncached = copy.deepcopy(model)
    apply_cache(model, "tea_cache", SKIP_ALL)
    run_at(model, name, inputs)
    skipped = run_at(model, name, inputs, timestep_scale=0.5)
    assert teacache_pattern(model) == {"default": "C-"}

    # Reference: the uncached model at the new timestep, its block stack replaced by the first step's.
    last_block = teacache_model_of(uncached).blocks(uncached)[-1]
    recorded = {}
    hook = last_block.register_forward_hook(lambda module, args, output: recorded.setdefault("output", output))
    run_at(uncached, name, inputs)
    hook.remove()
    last_block.register_forward_hook(lambda module, args, output: recorded["output"])
    expected = run_at(uncached, name, inputs, timestep_scale=0.5)
    assert rel_error(skipped, expected) < ROUNDING
    assert rel_error(skipped, run_at(uncached, name, inputs)) > 4 * ROUNDING  # the timestep mattered


@pytest.mark.parametrize("name", MODELS)
def test_models_without_a_published_fit_warn(name, caplog):
    model, _ = build(name)
    with caplog.at_level(logging.WARNING, logger="fp8_compile"):
        apply_cache(model, "tea_cache", {"num_inference_steps": 4})
    messages = [r.getMessage() for r in caplog.records]
    warned = any("no published coefficients" in m and "caching.fit" in m for m in messages)
    published = teacache_model_of(model).coefficients(model).published
    assert warned == (not published)
    # published for FLUX.1 and Qwen-Image; the tiny Wan width matches neither Wan2.1 table
    assert published == (name in ("flux", "qwen_image"))


# --- TeaCache's schedule, branches and generations (tiny FLUX, eager) ----------------------------


def test_threshold_sets_how_many_steps_are_computed():
    model, inputs = build("flux")
    with torch.no_grad():
        uncached = generate(model, "flux", inputs, 8)
    patterns = []
    for threshold in (0.0, 0.3, 1e6):
        cached = copy.deepcopy(model)
        apply_cache(cached, "tea_cache", {"rel_l1_thresh": threshold})
        with torch.no_grad():
            latents = generate(cached, "flux", inputs, 8)
        patterns.append(teacache_pattern(cached)["cond"])
        if threshold == 0.0:
            assert torch.equal(latents, uncached), "a cache that skips nothing must change nothing"
    assert patterns[0] == "C" * 8 and patterns[-1] == "C" + "-" * 6 + "C"  # first and last always computed
    assert 2 < patterns[1].count("C") < 8


def negative_prompt(inputs: dict) -> dict:
    """Inputs of another prompt for FLUX's unconditional branch: its T5 and pooled CLIP embeddings."""
    return {key: torch.randn_like(inputs[key]) for key in ("encoder_hidden_states", "pooled_projections")}


def test_cfg_branches_keep_their_own_residuals():
    model, inputs = build("flux")
    negative = negative_prompt(inputs)
    apply_cache(model, "tea_cache", SKIP_ALL)
    outputs = {}
    with torch.no_grad():
        for step in range(2):
            for branch, extra in (("cond", {}), ("uncond", negative)):
                with model.cache_context(branch, step_index=step, num_inference_steps=1000):
                    outputs[branch, step] = prediction(model(**{**inputs, **extra}))
    assert teacache_pattern(model) == {"cond": "C-", "uncond": "C-"}
    assert rel_error(outputs["cond", 0], outputs["uncond", 0]) > 10 * ROUNDING  # a shared residual would show
    for branch in ("cond", "uncond"):
        assert rel_error(outputs[branch, 1], outputs[branch, 0]) < ROUNDING


def test_call_order_tells_cfg_branches_apart_without_a_cache_context():
    model, inputs = build("flux")
    by_order = copy.deepcopy(model)
    negative = negative_prompt(inputs)
    apply_cache(model, "tea_cache", {"rel_l1_thresh": 0.3})
    apply_cache(by_order, "tea_cache", {"rel_l1_thresh": 0.3, "cfg_branches": 2, "num_inference_steps": 6})
    with torch.no_grad():
        named = generate(model, "flux", inputs, 6, negative=negative)
        ordered = generate(by_order, "flux", inputs, 6, negative=negative, context="none")
    assert torch.equal(named, ordered)
    assert list(teacache_pattern(by_order).values()) == list(teacache_pattern(model).values())
    assert "-" in teacache_pattern(model)["uncond"]


# How each generation tells its steps: the cache context's step index, the pipeline's scheduler,
# or counting calls up to cache_config's num_inference_steps.
@pytest.mark.parametrize("source", ["context", "scheduler", "count"])
def test_each_generation_starts_afresh(source):
    model, inputs = build("flux")
    scheduler = FlowMatchEulerDiscreteScheduler()
    options = {"rel_l1_thresh": 0.3}
    if source == "scheduler":
        apply_cache(TinyPipeline(model, scheduler), "tea_cache", options)
    else:
        apply_cache(model, "tea_cache", {**options, "num_inference_steps": 8} if source == "count" else options)
    style = {"context": "step", "scheduler": "name", "count": "none"}[source]
    with torch.no_grad():
        first = generate(model, "flux", inputs, 8, scheduler=scheduler, context=style)
        pattern = teacache_pattern(model)
        second = generate(model, "flux", inputs, 8, scheduler=scheduler, context=style)
    assert torch.equal(first, second) and teacache_pattern(model) == pattern
    assert all(p.startswith("C") and p.endswith("C") and "-" in p for p in pattern.values())


def test_reset_cache_forgets_the_residuals():
    model, inputs = build("flux")
    apply_cache(model, "tea_cache", SKIP_ALL)
    run_at(model, "flux", inputs)
    reset_cache(model)
    assert not teacache_state(model).branches
    run_at(model, "flux", inputs)
    assert teacache_pattern(model) == {"default": "C"}  # computed again after the reset


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "config", "message"),
    [
        ("tea_cache", {"rel_l1_thresh": -0.1}, "'rel_l1_thresh' must be a finite number >= 0, got -0.1"),
        ("tea_cache", {"rel_l1_thresh": "0.2"}, "'rel_l1_thresh' must be a finite number >= 0, got '0.2'"),
        ("tea_cache", {"rel_l1_thresh": True}, "'rel_l1_thresh' must be a finite number >= 0"),
        ("tea_cache", {"rel_l1_thresh": float("nan")}, "'rel_l1_thresh' must be a finite number >= 0"),
        ("tea_cache", {"rel_l1_treshold": 0.2}, "key 'rel_l1_treshold'; valid keys: rel_l1_thresh, coefficients,"),
        ("tea_cache", {"coefficients": ["a"]}, "'coefficients' must be a list of finite numbers"),
        ("tea_cache", {"cfg_branches": 0}, "'cfg_branches' must be an integer >= 1, got 0"),
        ("first_block_cache", {"threshold": -1}, "'threshold' must be a finite number >= 0, got -1"),
        ("first_block_cache", {"rel_l1_thresh": 0.2}, "first_block_cache cache_config key 'rel_l1_thresh'; valid keys"),
        ("tee_cache", {}, "cache_backend 'tee_cache'; choose one of: first_block_cache, mag_cache, taylorseer_cache,"),
    ],
)
def test_bad_cache_input_names_the_choices(backend, config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_cache_config(backend, config)  # checked without a model, before one is loaded
    model, _ = build("flux")
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_cache(model, backend, config)
    assert not hasattr(model.transformer_blocks[0], "_diffusers_hook"), "nothing is applied halfway"


def test_unsupported_denoisers_are_refused_with_the_choices():
    supported = "supported denoisers: Flux2Transformer2DModel, FluxTransformer2DModel, GlmImageTransformer2DModel"
    with pytest.raises(ValueError, match=f"TeaCache does not support Sequential; {supported}"):
        apply_cache(nn.Sequential(nn.Linear(4, 4)), "tea_cache", {})
    z_image, _ = build("z_image")
    with pytest.raises(ValueError, match="first_block_cache fails on ZImageTransformer2DModel .*='tea_cache'"):
        apply_cache(z_image, "first_block_cache", {})
    glm, _ = build("glm_image")
    with pytest.raises(ValueError, match="mag_cache cannot be applied to GlmImageTransformer2DModel: .*not registered"):
        apply_cache(glm, "mag_cache", {"mag_ratios": [1.0] * 4, "num_inference_steps": 4})
    flux, _ = build("flux")
    apply_cache(flux, "tea_cache", {})
    for backend in ("first_block_cache", "tea_cache"):
        with pytest.raises(ValueError, match="FluxTransformer2DModel already has a cache; apply one cache per"):
            apply_cache(flux, backend, {})
    with pytest.raises(TypeError, match="a diffusers pipeline or a denoiser nn.Module, got str"):
        apply_cache("flux", "tea_cache", {})


# --- fitting coefficients ------------------------------------------------------------------------


def test_fit_recovers_a_known_polynomial():
    truth = (300.0, -150.0, 30.0, -1.5, 0.2)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(60, generator=generator, dtype=torch.float64) * 0.3
    y = sum(c * x ** (len(truth) - 1 - i) for i, c in enumerate(truth))
    fitted = fit_coefficients(list(zip(x.tolist(), y.tolist(), strict=True)))
    assert fitted == pytest.approx(truth, rel=1e-6)
    with pytest.raises(ValueError, match="needs more than 4 samples, got 3"):
        fit_coefficients([(0.1, 0.2)] * 3)


def test_recorder_pairs_each_step_with_the_previous_one_of_its_branch():
    model, inputs = build("flux")
    negative = negative_prompt(inputs)
    recorder = TeaCacheRecorder(model)
    with torch.no_grad():
        for _ in range(2):  # two generations of 4 steps, two branches each
            generate(model, "flux", inputs, 4, negative=negative)
    assert len(recorder.samples) == 2 * 2 * 3  # no pair across generations or branches
    assert all(signal > 0 and output > 0 for signal, output in recorder.samples)


def test_fit_command_prints_coefficients_to_paste(capsys, tmp_path):
    out = tmp_path / "fit.json"
    command = ["--zoo", "flux", "--generations", "2", "--steps", "5", "--height", "64", "--width", "64"]
    assert fit_main([*command, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FluxTransformer2DModel: 8 samples" in printed
    assert 'cache_config = {"rel_l1_thresh": 0.2, "coefficients": [' in printed
    assert len(json.loads(out.read_text())["coefficients"]) == 5


# --- with omni_fp8 and torch.compile -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("style", ["regional", "regions", "whole"])
def test_teacache_with_omni_fp8_compiles_once_in_28_steps(style):
    model, inputs = build("flux")
    fp8_compile.quantize_(model)  # else the backend converts on the first call and compiles on the second
    apply_cache(model, "tea_cache", {"rel_l1_thresh": 0.3})
    if style == "regional":
        model.compile_repeated_blocks(backend="omni_fp8")
        runner = model
    elif style == "regions":
        fp8_compile.compile_regions(model, backend="omni_fp8")
        runner = model
    else:
        runner = torch.compile(model, backend="omni_fp8")
    counts = []
    with torch.no_grad():
        generate(runner, "flux", inputs, 28, on_step=lambda step: counts.append(compile_counts()))
    graphs, breaks, _ = counts[0]
    assert counts == [counts[0]] * 28, "compiled again after the first step"
    pattern = teacache_pattern(model)["cond"]
    assert pattern[0] == pattern[-1] == "C" and pattern.count("-") >= 10
    # One break per block class where the hook hands over to the compiled block forward; the
    # whole-model graph also breaks at the block loop. Documented in docs/caching.md.
    assert breaks == {"regional": 3, "regions": 3, "whole": 4}[style]
    print(f"TeaCache + omni_fp8, {style} compile: {graphs} graphs, {breaks} graph breaks, pattern {pattern}")


def _diffusers_cache_computed(model: nn.Module, head_hook: str) -> bool:
    """Whether the last "cond" call of a diffusers cache computed its blocks (read from its state)."""
    head = model.transformer_blocks[0]._diffusers_hook.get_hook(head_hook)
    return head.state_manager._state_cache["cond"].should_compute


@pytest.mark.slow
def test_first_block_cache_with_omni_fp8_regional_compile():
    model, inputs = build("flux")
    fp8_compile.quantize_(model)
    apply_cache(model, "first_block_cache", {"threshold": 0.05})
    model.compile_repeated_blocks(backend="omni_fp8")
    other = {**inputs, "hidden_states": torch.randn_like(inputs["hidden_states"])}
    # Repeated inputs make the first block's residual repeat (skip), new ones make it change (compute).
    steps = [inputs, inputs, other, other, inputs, inputs]
    computed, counts = [], []
    with torch.no_grad():
        for step_inputs in steps:
            with model.cache_context("cond"):
                model(**step_inputs)
            computed.append(_diffusers_cache_computed(model, "fbc_leader_block_hook"))
            counts.append(compile_counts())
    assert computed == [True, False, True, False, True, False]
    # diffusers' hooks are traced into the block graphs: compute, skip and compute-after-skip
    # each compile their variant once (warm-up: 3 steps); after that nothing compiles.
    assert counts[2:] == [counts[2]] * (len(steps) - 2)


@pytest.mark.slow
def test_mag_cache_with_omni_fp8_whole_model_compile():
    model, inputs = build("flux")
    fp8_compile.quantize_(model)
    apply_cache(model, "mag_cache", {"mag_ratios": [1.0] * 8, "num_inference_steps": 8, "retention_ratio": 0.0})
    runner = torch.compile(model, backend="omni_fp8")
    counts, computed = [], []

    def after(step: int) -> None:
        counts.append(compile_counts())
        computed.append(_diffusers_cache_computed(model, "mag_cache_leader_block_hook"))

    with torch.no_grad():
        generate(runner, "flux", inputs, 8, on_step=after)
    # MagCache computes, then skips up to max_skip_steps=3 steps. Its hooks are
    # torch.compiler.disable'd in diffusers, so its blocks run eagerly (FP8 ops, uncompiled). Its
    # skipped stack output is laid out unlike the computed one, so the output norm compiles again
    # at the first skip (warm-up: 2 steps); after that nothing compiles.
    assert computed == [True, False, False, False, True, False, False, False]
    assert counts[2:] == [counts[1]] * 6
