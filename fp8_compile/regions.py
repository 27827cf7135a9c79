"""Regional compile of the blocks and of the modules around them.

diffusers' ``compile_repeated_blocks`` compiles the transformer blocks, one graph per block
class, and leaves the modules around them eager: for FLUX the timestep, guidance and text
embedders, the rotary table (``pos_embed``, computed in float64 at every forward), the input
embedders and the output norm and projection. Those run first, as ~100 small eager kernels whose
launches take the host milliseconds while the GPU has nothing else queued: on an H100 the first
tenth of a FLUX.1-dev forward held 6.1 of its 10.0 ms of GPU idle time. Compiled, each of those
modules is a graph of a few kernels; with CUDA graphs the first tenth then idled 1.6 ms, and
the forward took 81.1 and 83.9 ms where the blocks alone gave 83.6 and 86.0 on the same machines
(BENCHMARKS.md, twelfth session).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from fp8_compile.convert import quantize_
from fp8_compile.cudagraphs import mark_cudagraph_steps

logger = logging.getLogger("fp8_compile")


def compile_regions(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``model.compile_repeated_blocks(**compile_kwargs)``, then every child of ``model`` that
    holds no repeated block (the entries of a ModuleDict or ModuleList child) compiled on its own
    with the same arguments (``fullgraph`` aside: a graph break there costs a split graph, not an
    error). With ``backend="omni_fp8"`` the model is converted first (``quantize_`` with the same
    options). With CUDA graphs
    (``options={"cudagraphs": True}`` or ``mode="reduce-overhead"``) it also marks one CUDA-graph
    step per forward (:func:`mark_cudagraph_steps`). Returns the names of the children compiled.

    ``model`` is a diffusers model that names its repeated blocks (``_repeated_blocks``), e.g.
    ``compile_regions(pipe.transformer, backend="omni_fp8", options={"fp8_attention": True})``.
    """
    block_classes = set(getattr(model, "_repeated_blocks", None) or ())
    if not block_classes:
        raise ValueError(
            f"compile_regions: {type(model).__name__} names no repeated blocks (diffusers' _repeated_blocks); "
            "compile it with torch.compile(model, ...) instead"
        )
    if compile_kwargs.get("backend") == "omni_fp8":
        # Converted first: a module around the blocks may be a bare nn.Linear (FLUX's proj_out),
        # which a conversion on first call would replace by an uncompiled ScaledLinear.
        quantize_(model, compile_kwargs.get("options"))
    model.compile_repeated_blocks(**compile_kwargs)
    options = compile_kwargs.get("options") or {}
    if compile_kwargs.get("mode") == "reduce-overhead" or options.get("cudagraphs") is True:
        mark_cudagraph_steps(model)  # one CUDA-graph generation per forward, not per region
    child_kwargs = {key: value for key, value in compile_kwargs.items() if key != "fullgraph"}
    compiled = []
    for name, child in _modules_around(model, block_classes):
        child.compile(**child_kwargs)
        compiled.append(name)
    logger.info("compile_regions: compiled %s's blocks and, around them, %s", type(model).__name__, ", ".join(compiled))
    return compiled


def _modules_around(module: nn.Module, block_classes: set[str], prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The children of ``module`` that hold no repeated block, looking into containers that are
    never called themselves (``nn.ModuleDict``, ``nn.ModuleList``: Z-Image's ``all_x_embedder``),
    whose ``.compile()`` would compile nothing."""
    found = []
    for name, child in module.named_children():
        if any(type(m).__name__ in block_classes for m in child.modules()):
            continue
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            found += _modules_around(child, block_classes, f"{prefix}{name}.")
        else:
            found.append((prefix + name, child))
    return found
