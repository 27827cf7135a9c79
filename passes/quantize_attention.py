"""Quantize: attention in FP8 (option ``fp8_attention``, off by default).

Each ``scaled_dot_product_attention`` call becomes :func:`fp8_compile.attention.fp8_attention`:
Q, K and V quantized per tensor, cuDNN's FP8 attention, the output dequantized. Calls the FP8
kernel cannot take stay as they are, and the log says why: a mask, dropout, causal or grouped
heads, a head dim cuDNN does not support. The option covers every attention call the kernel can
take; ``ignored_layers`` names linear layers and does not keep attention out.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn.functional as F

from fp8_compile import attention
from fp8_compile.passes.graph import Fp8Graph
from fp8_compile.passes.pass_manager import GraphPass

logger = logging.getLogger("fp8_compile")

SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_arguments(node: fx.Node) -> dict:
    """A ``scaled_dot_product_attention`` call's arguments by name, however they were spelled."""
    return {**SDPA_DEFAULTS, **dict(zip(SDPA_ARGUMENTS, node.args)), **node.kwargs}


def _example(value):
    return value.meta.get("example_value") if isinstance(value, fx.Node) else None


def _unsupported_reason(arguments: dict) -> str | None:
    for name in ("attn_mask", "dropout_p", "is_causal", "enable_gqa"):
        if arguments[name] != SDPA_DEFAULTS[name]:
            return f"{name}={arguments[name]}" if name != "attn_mask" else "an attention mask"
    if not isinstance(arguments["scale"], (float, int, type(None))):
        return "a softmax scale computed in the graph"
    operands = [_example(arguments[name]) for name in ("query", "key", "value")]
    if not all(isinstance(t, torch.Tensor) for t in operands):
        return "operands of unknown shape"
    return attention.unsupported_reason(*operands)


class QuantizeAttention(GraphPass):
    def __call__(self, graph: Fp8Graph) -> None:
        if not graph.config.fp8_attention:
            return
        fx_graph = graph.gm.graph
        calls = [n for n in fx_graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
        if not calls:
            return
        attention.prepare_device(graph.device)
        kept = {}
        for node in calls:
            arguments = sdpa_arguments(node)
            reason = _unsupported_reason(arguments)
            if reason is not None:
                kept[node.name] = reason
                continue
            query = arguments["query"]
            scale = arguments["scale"]
            if scale is None:
                scale = attention.default_scale(_example(query).shape[-1])
            with fx_graph.inserting_before(node):
                fp8 = fx_graph.call_function(
                    attention.fp8_attention, (query, arguments["key"], arguments["value"], float(scale))
                )
            fp8.meta.update(node.meta)
            node.replace_all_uses_with(fp8)
            fx_graph.erase_node(node)
        graph.fp8_attention_calls += len(calls) - len(kept)
        logger.info("omni_fp8: %d of %d attention calls in FP8", len(calls) - len(kept), len(calls))
        for name, reason in kept.items():
            logger.info("omni_fp8: attention call %s stays in its dtype: %s", name, reason)
