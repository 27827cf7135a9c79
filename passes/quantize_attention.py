"""Quantize: attention in FP8 (option ``fp8_attention``, off by default).

Each ``scaled_dot_product_attention`` call becomes :func:`fp8_compile.attention.fp8_attention`:
Q, K and V quantized per tensor, cuDNN's FP8 attention, the output dequantized. Q and K are
scaled from the bound their normalization puts on them where the graph shows one
(:class:`MagnitudeBound`), so their quantization needs no reduction. Calls the FP8
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
from fp8_compile.passes.graph import Fp8Graph, example_value, named_arguments
from fp8_compile.passes.magnitude_bound import MagnitudeBound
from fp8_compile.passes.pass_manager import GraphPass

logger = logging.getLogger("fp8_compile")

# a tensor this many times smaller than Q and K may be reduced to bound them (see MagnitudeBound)
MEASURED_FRACTION = 8
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_arguments(node: fx.Node) -> dict:
    """A ``scaled_dot_product_attention`` call's arguments by name, however they were spelled."""
    return {**SDPA_DEFAULTS, **named_arguments(node, SDPA_ARGUMENTS)}


def _unsupported_reason(arguments: dict) -> str | None:
    # enable_gqa is no reason: operands with grouped heads are refused by their shapes below
    if arguments["attn_mask"] is not None:
        return "an attention mask"
    for name in ("dropout_p", "is_causal"):
        if arguments[name] != SDPA_DEFAULTS[name]:
            return f"{name}={arguments[name]}"
    if not isinstance(arguments["scale"], (float, int, type(None))):
        return "a softmax scale computed in the graph"
    operands = [example_value(arguments[name]) for name in ("query", "key", "value")]
    if not all(isinstance(t, torch.Tensor) for t in operands):
        return "operands of unknown shape"
    return attention.unsupported_reason(*operands)


class QuantizeAttention(GraphPass):
    def __init__(self, bound_operands: bool = True):
        # False: Q and K always measure their amax (what the bounds buy, in benchmarks/bench_dit.py)
        self.bound_operands = bound_operands

    def __call__(self, graph: Fp8Graph) -> None:
        if not graph.config.fp8_attention:
            return
        fx_graph = graph.gm.graph
        calls = [n for n in fx_graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
        if not calls:
            logger.info(
                "omni_fp8: option 'fp8_attention' is on, but this graph calls no scaled_dot_product_attention "
                "(attention through another backend, e.g. flash-attn, is left as it is)"
            )
            return
        converted, kept = [], {}
        for node in calls:
            arguments = sdpa_arguments(node)
            reason = _unsupported_reason(arguments)
            if reason is None:
                converted.append((node, arguments))
            else:
                kept[node.name] = reason
        if converted:
            attention.prepare_device(graph.device)
        bounded = {"Q": 0, "K": 0}
        for node, arguments in converted:
            scale = None if arguments["scale"] is None else float(arguments["scale"])
            query, key = arguments["query"], arguments["key"]
            query_bound = key_bound = None
            if self.bound_operands:
                # only tensors far smaller than Q and K (norm weights, rotary tables) are reduced
                smallest = min(example_value(query).numel(), example_value(key).numel())
                bound = MagnitudeBound(fx_graph, node, max_measured_numel=smallest // MEASURED_FRACTION)
                query_bound, key_bound = bound(query), bound(key)
            bounded["Q"] += query_bound is not None
            bounded["K"] += key_bound is not None
            with fx_graph.inserting_before(node):
                fp8 = fx_graph.call_function(
                    attention.fp8_attention,
                    (query, key, arguments["value"], scale, query_bound, key_bound),
                )
            fp8.meta.update(node.meta)
            node.replace_all_uses_with(fp8)
            fx_graph.erase_node(node)
        logger.info("omni_fp8: %d of %d attention calls in FP8", len(converted), len(calls))
        if converted:
            logger.info(
                "omni_fp8: Q scaled from its normalization's bound (no amax pass) in %d, K in %d of %d FP8 "
                "attention calls; the others measure an amax",
                bounded["Q"],
                bounded["K"],
                len(converted),
            )
        for name, reason in kept.items():
            logger.info("omni_fp8: attention call %s stays in its dtype: %s", name, reason)
