"""CUDA graphs for regionally compiled models.

With ``options={"cudagraphs": True}`` every compiled graph is replayed as a CUDA graph, through
Inductor's CUDA-graph trees. The trees start a new generation, and reuse the memory of the last
one's outputs, each time a compiled function is entered from eager code. A whole-model compile
enters once per forward, so that is right. ``compile_repeated_blocks`` enters once per *block*:
each block would start a generation and the block after it would read outputs whose memory the
trees already count as free. Marking a step at the start of each model forward instead makes one
generation per forward, in which the blocks record one path of graphs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle


def mark_cudagraph_steps(model: nn.Module) -> RemovableHandle:
    """Begin one CUDA-graph generation per call of ``model``; returns the hook's handle.

    Call it on the module whose blocks were compiled with ``cudagraphs=True`` (e.g. the
    transformer after ``compile_repeated_blocks``). Tensors a forward returns from inside a
    CUDA graph are valid until the next forward: clone what must live longer.
    """
    return model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
