"""TeaCache: skip a denoiser's block stack on steps whose input barely changed.

At every denoiser call the first block's timestep-modulated input (the signal, see ``specs.py``)
is compared with the previous call's of the same CFG branch: ``rel = mean|s - s_prev| /
mean|s_prev|``. The model's polynomial rescales ``rel`` to an estimate of the output's change,
which accumulates; while the accumulation stays under ``rel_l1_thresh`` the block stack is
skipped and its cached residual (stack output minus stack input, from the last computed step)
is added to the stack input instead. Everything outside the stack (embedders, output norm and
projection) still runs with the current timestep. The first ``warmup_steps`` and the last step
of a generation are always computed.

How it is wired: diffusers' hooks (``HookRegistry``), no forward is patched. Each block of the
stack gets a :class:`TeaCacheBlockHook` whose ``new_forward`` is excluded from compilation
(``torch.compiler.disable(recursive=False)``): the skip decision and the bookkeeping run as
plain Python, while the block's own ``forward`` called from there is compiled as usual (one
graph per block class and input layout), whether the model was compiled whole or regionally;
``fullgraph=True`` is therefore not possible with a cache. A skipped block
returns its inputs laid out (sizes and strides) exactly like its computed outputs, so compiled
code downstream sees the same tensors either way and is never recompiled because of a skip.
The denoiser itself gets a :class:`TeaCacheModelHook` that holds the state, receives diffusers'
``cache_context(name, step_index=..., num_inference_steps=...)`` and is reset by
``_reset_stateful_cache()`` (which pipelines call at the end of a generation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from fp8_compile.caching.layout import Layout, layouts_of, with_layouts
from fp8_compile.caching.specs import BLOCK_IO, BlockIO, Coefficients, TeaCacheModel, teacache_model_of

logger = logging.getLogger("fp8_compile")

MODEL_HOOK = "fp8_compile_teacache"
BLOCK_HOOK = "fp8_compile_teacache_block"
DEFAULT_BRANCH = "default"


@dataclass(frozen=True)
class TeaCacheConfig:
    """``cache_config`` of ``cache_backend="tea_cache"``."""

    rel_l1_thresh: float = 0.2
    coefficients: tuple[float, ...] | None = None  # None: the model's published (or default) polynomial
    num_inference_steps: int | None = None  # where neither the pipeline nor the cache context says it
    warmup_steps: int | None = None  # None: the model's default (1; Wan: 5)
    cfg_branches: int = 1  # denoiser calls per step, told apart by call order when no cache_context names them

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> TeaCacheConfig:
        """Validate a ``cache_config`` dict; a ValueError names the key at fault and the valid ones."""
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown tea_cache cache_config key {unknown[0]!r}; valid keys: {', '.join(known)}")
        if "rel_l1_thresh" in options:
            options["rel_l1_thresh"] = non_negative_number("rel_l1_thresh", options["rel_l1_thresh"])
        if options.get("coefficients") is not None:
            options["coefficients"] = _polynomial(options["coefficients"])
        for key, minimum in (("num_inference_steps", 1), ("warmup_steps", 0), ("cfg_branches", 1)):
            if options.get(key) is not None:
                options[key] = _integer(key, options[key], minimum)
        return cls(**options)


def non_negative_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"cache_config {key!r} must be a finite number >= 0, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"cache_config {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _polynomial(value: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in value)
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(c) for c in values):
        raise ValueError(
            f"cache_config 'coefficients' must be a list of finite numbers, highest degree first "
            f"(as printed by python -m fp8_compile.caching.fit), got {value!r}"
        )
    return values


@dataclass
class Branch:
    """The state of one CFG branch (cond, uncond, ...) within one generation."""

    previous_signal: torch.Tensor | None = None
    accumulated: float = 0.0
    stack_input: torch.Tensor | None = None  # of the call being computed
    residual: torch.Tensor | None = None  # stack output minus stack input, of the last computed call
    last_step: int = -1
    calls: int = 0


@dataclass
class Call:
    """Where a denoiser call stands: its branch, its step and the generation's length, where known."""

    branch: str
    step: int | None
    total: int | None


class TeaCacheState:
    """The decisions and caches of one denoiser, shared by its hooks."""

    def __init__(
        self, model_name: str, config: TeaCacheConfig, coefficients: tuple[float, ...], warmup_steps: int,
        scheduler: Any,
    ):
        self.model_name = model_name
        self.config = config
        self.coefficients = coefficients
        self.warmup_steps = warmup_steps
        self.scheduler = scheduler  # a pipeline's scheduler tells the step and the number of steps
        # diffusers' per-context state container: it receives cache_context(...); only its context is read.
        self.context = StateManager(Branch)
        self.branches: dict[str, Branch] = {}
        self.patterns: dict[str, list[bool]] = {}  # per branch, the last generation: True = computed
        self.calls_without_context = 0
        self.branch: Branch | None = None  # of the call in progress
        self.branch_name = DEFAULT_BRANCH  # of the call in progress
        self.skipping = False
        self.last_relative_change: float | None = None  # of the call in progress, for the fit recorder
        self._warned_unknown_length = False

    def reset(self) -> None:
        """Forget every branch's caches (a generation ended); the last patterns stay readable."""
        self.branches.clear()
        self.calls_without_context = 0
        self.branch, self.skipping = None, False

    def locate(self) -> Call:
        """This call's branch and step (counts a call made outside any cache context)."""
        context = self.context._context  # set by diffusers' cache_context(...), None outside it
        if context is not None:
            step = getattr(context, "step_index", None)
            call = Call(getattr(context, "name", context), step, getattr(context, "num_inference_steps", None))
        else:
            index = self.calls_without_context % self.config.cfg_branches
            self.calls_without_context += 1
            call = Call(DEFAULT_BRANCH if self.config.cfg_branches == 1 else f"branch{index}", None, None)
        timesteps = getattr(self.scheduler, "timesteps", None)
        if call.step is None and timesteps is not None:
            call.step = getattr(self.scheduler, "step_index", None) or 0  # None until the first scheduler step
            call.total = call.total or len(timesteps)
        call.total = call.total or self.config.num_inference_steps
        return call

    def begin(self, signal: torch.Tensor, stack_input: torch.Tensor) -> None:
        """Decide whether this call computes the block stack (called by the first block)."""
        call = self.locate()
        branch = self.branches.get(call.branch)
        if call.step is None:
            call.step = branch.calls if branch is not None else 0
            if call.total is not None and call.step >= call.total:  # counted past the end: a new generation
                call.step = 0
        if branch is None or call.step <= branch.last_step:  # first call, or the step count started over
            branch = self.branches[call.branch] = Branch()
            self.patterns[call.branch] = []
        if call.total is None and not self._warned_unknown_length:
            self._warned_unknown_length = True
            logger.warning(
                "TeaCache on %s does not know the number of steps, so it cannot always compute the last one; "
                "apply the cache to the pipeline, pass cache_context(..., num_inference_steps=N) or "
                "cache_config={'num_inference_steps': N}",
                self.model_name,
            )
        compute = self._decide(branch, call, signal, stack_input)
        branch.previous_signal = signal.detach()
        branch.last_step, branch.calls = call.step, branch.calls + 1
        branch.stack_input = stack_input if compute else None
        self.patterns[call.branch].append(compute)
        self.branch, self.branch_name, self.skipping = branch, call.branch, not compute

    def _decide(self, branch: Branch, call: Call, signal: torch.Tensor, stack_input: torch.Tensor) -> bool:
        self.last_relative_change = None
        comparable = branch.previous_signal is not None and branch.previous_signal.shape == signal.shape
        if comparable:
            self.last_relative_change = relative_l1(signal, branch.previous_signal)
        forced = (
            not comparable
            or branch.residual is None
            or branch.residual.shape != stack_input.shape
            or call.step < self.warmup_steps
            or (call.total is not None and call.step >= call.total - 1)
        )
        if forced:
            branch.accumulated = 0.0
            return True
        # Where a fitted polynomial dips below zero (tiny changes) it would pay back accumulated
        # distance; a change never makes the next skip safer, so it counts as zero.
        branch.accumulated += max(float(np.polyval(self.coefficients, self.last_relative_change)), 0.0)
        if branch.accumulated < self.config.rel_l1_thresh:
            return False
        branch.accumulated = 0.0
        return True

    def skipped_stack_output(self, stack_input: torch.Tensor) -> torch.Tensor:
        return stack_input + self.branch.residual

    def finish(self, stack_output: torch.Tensor) -> None:
        """Cache the residual of the stack just computed (called by the last block)."""
        branch = self.branch
        stack_input = branch.stack_input
        if stack_output.shape != stack_input.shape:
            # FLUX.2 leaves its stack on the joint text + image sequence, image tokens last.
            if stack_output.shape[0] != stack_input.shape[0] or stack_output.shape[2:] != stack_input.shape[2:]:
                raise RuntimeError(
                    f"TeaCache on {self.model_name}: the block stack returned {tuple(stack_output.shape)} for an "
                    f"input of {tuple(stack_input.shape)}, which it cannot relate"
                )
            stack_output = stack_output[:, -stack_input.shape[1] :]
        branch.residual = stack_output - stack_input
        branch.stack_input = None


def relative_l1(signal: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|signal - previous| / mean|previous|``, the change TeaCache measures."""
    previous = previous.float()
    return ((signal.float() - previous).abs().mean() / previous.abs().mean()).item()


class TeaCacheModelHook(ModelHook):
    """On the denoiser: owns the state, so that diffusers' cache_context and resets reach it."""

    _is_stateful = True

    def __init__(self, state: TeaCacheState):
        super().__init__()
        self.state = state
        # diffusers' cache_context(...) sets the context on every StateManager attribute of a stateful hook.
        self.context = state.context

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module


class TeaCacheBlockHook(ModelHook):
    """On each block of the stack: the first decides, all pass their inputs on when skipping, the last caches."""

    def __init__(self, state: TeaCacheState, io: BlockIO, spec: TeaCacheModel, is_first: bool, is_last: bool):
        super().__init__()
        self.state, self.io, self.spec = state, io, spec
        self.is_first, self.is_last = is_first, is_last
        self.output_layouts: dict[tuple[Layout, ...], tuple[Layout, ...]] = {}  # input layouts -> computed outputs'
        self.inputs_layout: tuple[Layout, ...] = ()  # of the call in progress

    # Only this frame is kept out of compilation: the block's forward, called from here, is
    # compiled as its own frame. Everything else the hook does runs in the fully disabled helpers.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        skipped = self._before(module, args, kwargs)
        if skipped is not None:
            return skipped
        output = self.fn_ref.original_forward(*args, **kwargs)
        self._after(output)
        return output

    @torch.compiler.disable
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> Any | None:
        """Decide (the first block does); returns the block's outputs on a skipped step, else None."""
        arguments = self.io.bind(module, args, kwargs)
        streams = {"hidden": arguments[self.io.hidden], "encoder": arguments.get(self.io.encoder)}
        if self.is_first:
            self.state.begin(self.spec.modulated_input(module, arguments), streams["hidden"])
        self.inputs_layout = layouts_of([t for t in streams.values() if t is not None])
        if not self.state.skipping:
            return None
        if self.is_first:
            streams["hidden"] = self.state.skipped_stack_output(streams["hidden"])
        outputs = tuple(streams[name] for name in self.io.returns)
        layouts = self.output_layouts.get(self.inputs_layout)  # known: the stack computed these inputs before
        if layouts is not None:
            outputs = with_layouts(outputs, layouts)
        return outputs if len(outputs) > 1 else outputs[0]

    @torch.compiler.disable
    def _after(self, output: Any) -> None:
        self.output_layouts[self.inputs_layout] = layouts_of(self.io.outputs(output))
        if self.is_last:
            self.state.finish(self.io.hidden_output(output))


def apply_teacache(model: nn.Module, config: TeaCacheConfig, scheduler: Any = None) -> TeaCacheState:
    """Register TeaCache's hooks on ``model`` (a denoiser in scope); returns its state.

    ``scheduler``: the pipeline's, whose ``step_index`` and ``timesteps`` tell each call's step
    and the generation's length where the cache context does not.
    """
    model = getattr(model, "_orig_mod", model)  # hooks go on the module that torch.compile wraps
    spec = teacache_model_of(model)
    refuse_second_cache(model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    blocks = spec.blocks(model)
    if not blocks:
        raise ValueError(f"TeaCache: {type(model).__name__} has no blocks in {', '.join(spec.stacks)}")
    coefficients = _coefficients_for(model, spec, config)
    warmup_steps = spec.warmup_steps if config.warmup_steps is None else config.warmup_steps
    state = TeaCacheState(type(model).__name__, config, coefficients, warmup_steps, scheduler)
    registry.register_hook(TeaCacheModelHook(state), MODEL_HOOK)
    for index, block in enumerate(blocks):
        hook = TeaCacheBlockHook(state, BLOCK_IO[type(block).__name__], spec, index == 0, index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
    # cache_context() walks a cached list of the hooked submodules, built before these hooks existed.
    registry.invalidate_child_registries_cache()
    logger.info(
        "TeaCache on %s: rel_l1_thresh=%g over %d blocks, coefficients from %s",
        type(model).__name__, config.rel_l1_thresh, len(blocks),
        "cache_config" if config.coefficients else spec.coefficients(model).source,
    )
    return state


def refuse_second_cache(model: nn.Module) -> None:
    """Raise if ``model`` already has TeaCache or one of diffusers' caches: their hooks do not stack."""
    registry = getattr(model, "_diffusers_hook", None)
    if getattr(model, "is_cache_enabled", False) or (registry is not None and registry.get_hook(MODEL_HOOK)):
        raise ValueError(f"{type(model).__name__} already has a cache; apply one cache per denoiser")


def _coefficients_for(model: nn.Module, spec: TeaCacheModel, config: TeaCacheConfig) -> tuple[float, ...]:
    if config.coefficients is not None:
        return config.coefficients
    published: Coefficients = spec.coefficients(model)
    if not published.published:
        logger.warning(
            "TeaCache has no published coefficients for %s; using the %s. Fit your own with "
            "`python -m fp8_compile.caching.fit` and pass cache_config={'coefficients': [...]}",
            type(model).__name__, published.source,
        )
    return published.values


def teacache_state(model: nn.Module) -> TeaCacheState:
    """The state of the TeaCache applied to ``model``."""
    registry = getattr(getattr(model, "_orig_mod", model), "_diffusers_hook", None)
    hook = registry.get_hook(MODEL_HOOK) if registry is not None else None
    if hook is None:
        raise ValueError(f"{type(model).__name__} has no TeaCache; apply it with apply_cache(model, 'tea_cache', ...)")
    return hook.state


def teacache_pattern(model: nn.Module) -> dict[str, str]:
    """Per CFG branch, the last generation's steps so far: ``C`` computed, ``-`` skipped."""
    patterns = teacache_state(model).patterns
    return {branch: "".join("C" if computed else "-" for computed in steps) for branch, steps in patterns.items()}
