"""Runs the graph passes in one fixed, visible order."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fp8_compile.passes.graph import Fp8Graph, written_by

logger = logging.getLogger("fp8_compile")


class GraphPass:
    """One transformation of an :class:`Fp8Graph`. Subclasses implement ``__call__``."""

    def __call__(self, graph: Fp8Graph) -> None:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__


class PassManager:
    def __init__(self, passes: Sequence[GraphPass]):
        self.passes = list(passes)

    def __call__(self, graph: Fp8Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)
            graph.gm.graph.lint()
            logger.debug("omni_fp8 pass %s done", graph_pass.name)
        # FX counts no method call as a side effect, but Dynamo's graphs keep in-place ones
        # (q.mul_(2)) whose results nobody reads: removing them would change the numbers
        graph.gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or written_by(n) is not None)
        graph.gm.recompile()
