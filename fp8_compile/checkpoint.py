"""FP8 checkpoints: save a converted model, load it (or a public pre-quantized checkpoint) into a
freshly built one without ever making its BF16 weights.

    report = fp8_compile.quantize_(model, options)
    save_quantized(model, "flux-fp8.safetensors")

    with skeleton():                      # parameters on the meta device: no memory, no init
        model = FluxTransformer2DModel.from_config(config)
    load_quantized(model, "flux-fp8.safetensors", device="cuda")

Three formats are read, told apart by their metadata / quantization config:

* this package's own (``save_quantized``): one safetensors file with every tensor of the
  converted model, and metadata holding the format, the model class, the options, the
  quantization report and how each FP8 module was built;
* ModelOpt FP8 exports: a folder whose ``hf_quant_config.json`` (``quantization.quant_algo:
  "FP8"``) or ``config.json`` (``quantization_config`` with ``quant_method: "modelopt"``) says
  so; an FP8 linear has an e4m3 ``weight`` and float32 per-tensor ``weight_scale`` and
  ``input_scale`` (dequantized weight = weight * weight_scale, activation quantized as
  x / input_scale); ``exclude_modules`` lists the layers kept in high precision. They load as
  static per-tensor W8A8 layers;
* block-FP8 checkpoints: ``config.json`` with ``quantization_config`` ``quant_method: "fp8"``
  and ``weight_block_size``; an FP8 linear has an e4m3 ``weight`` and a float32
  ``weight_scale_inv`` with one entry per block, the multiplier that dequantizes it. They load
  as :class:`~fp8_compile.blockwise.BlockScaledLinear` layers (dynamic per-group activations).

A layer is FP8 exactly when its ``weight`` in the checkpoint is e4m3. Tensors are read one at a
time straight to ``device``; a quantized layer's placeholder weight is dropped, never cast, so
the peak memory of a load is the loaded model plus one tensor.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fp8_compile.blockwise import BlockScaledLinear
from fp8_compile.convert import keep_weights
from fp8_compile.modules import ScaledLinear
from fp8_compile.moe import EXPERT_WEIGHTS, Fp8Experts
from fp8_compile.patterns import shown_names
from fp8_compile.report import (
    Decision,
    LayerReport,
    QuantizationReport,
    quantization_report,
    record_report,
    tensor_bytes,
)

logger = logging.getLogger("fp8_compile")

FORMAT = "fp8_compile.checkpoint"
FORMAT_VERSION = "1"


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no initialisation).

    Buffers are built as usual: models compute some at construction (rotary frequencies) and
    do not store them in checkpoints. :func:`load_quantized` then fills every parameter.
    """
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


# ---------------------------------------------------------------------------------- saving


def _module_entry(module: nn.Module) -> dict[str, Any] | None:
    """How to rebuild an FP8 module from its tensors (None for modules left as they were)."""
    if isinstance(module, BlockScaledLinear):
        return {"kind": "block", "block_size": list(module.block_size)}
    if isinstance(module, ScaledLinear):
        return {
            "kind": "scaled",
            "quantize_input": module.quantize_input,
            "granularity": module.granularity,
            "fast_accum": module.fast_accum,
        }
    if isinstance(module, Fp8Experts):
        return {"kind": "experts", "fast_accum": module.fast_accum}
    return None


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a converted ``model`` (FP8 weights, scales, every other tensor, the options, the
    report) to one safetensors file. Tensors shared by several names are stored once."""
    model = getattr(model, "_orig_mod", model)
    report = quantization_report(model)
    if report is None:
        raise ValueError(f"{type(model).__name__} was not converted by fp8_compile; call fp8_compile.quantize_ first")
    modules = {name: entry for name, module in model.named_modules() if (entry := _module_entry(module)) is not None}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "config": json.dumps(report.config),
        "report": json.dumps(report.to_dict()),
        "modules": json.dumps(modules),
        "aliases": json.dumps(aliases),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


# ---------------------------------------------------------------------------------- reading


@dataclass
class CheckpointFiles:
    """The safetensors files of a checkpoint, which file holds which tensor, and open handles
    that read tensors one at a time straight to ``device``."""

    source: str  # for error messages
    file_of: dict[str, str]
    device: str | torch.device
    aliases: dict[str, str] = field(default_factory=dict)  # a name stored under another (tied tensors)
    handles: dict[str, Any] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def open(cls, path: Path, device: str | torch.device) -> CheckpointFiles:
        source = f"FP8 checkpoint {str(path)!r}"
        indexes = sorted(path.glob("*.safetensors.index.json")) if path.is_dir() else []
        if indexes:
            weight_map = _read_json(indexes[0])["weight_map"]
            return cls(source, {name: str(path / file) for name, file in weight_map.items()}, device)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no safetensors file in {str(path)!r}")
        checkpoint = cls(source, {}, device)
        for file in files:
            checkpoint.file_of.update(dict.fromkeys(checkpoint.handle(str(file)).keys(), str(file)))
        return checkpoint

    def handle(self, file: str) -> Any:
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(_safe_open(Path(file), self.device))
        return self.handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of or name in self.aliases

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            # an FP8 layer's scale (weight_scale, input_scale, weight_scale_inv) the format requires
            raise ValueError(f"{self.source} lacks tensor {name!r}")
        return self.handle(self.file_of[name]).get_tensor(name)

    def stored_dtype(self, name: str) -> str | None:
        """The dtype as safetensors names it ("F8_E4M3", "BF16", ...), read from the header only."""
        if name not in self.file_of:
            return None
        return self.handle(self.file_of[name]).get_slice(name).get_dtype()

    def stored_shape(self, name: str) -> torch.Size:
        """The shape of the stored tensor ``name`` (or of the one it is an alias of), from the header."""
        stored = self.aliases.get(name, name)
        return torch.Size(self.handle(self.file_of[stored]).get_slice(stored).get_shape())

    def close(self) -> None:
        self.stack.close()


def _safe_open(path: Path, device: str | torch.device) -> Any:
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with _safe_open(path, "cpu") as f:
        return f.metadata() or {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"FP8 checkpoint file {str(path)!r} is not valid JSON: {error}") from None


def quantization_config(path: Path) -> dict[str, Any]:
    """The pre-quantized checkpoint's quantization config (``{}`` when it has none)."""
    if path.is_dir():
        hf_quant = path / "hf_quant_config.json"
        if hf_quant.is_file():
            data = _read_json(hf_quant)
            return {"quant_method": data.get("producer", {}).get("name", "modelopt"), **data.get("quantization", {})}
        config = path / "config.json"
        if config.is_file():
            return _read_json(config).get("quantization_config") or {}
    return {}


# ---------------------------------------------------------------------------------- loading


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``name`` (a parameter stays one)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


class _Loader:
    """Builds the FP8 modules of one checkpoint format, then fills every other tensor."""

    def __init__(self, model: nn.Module, files: CheckpointFiles):
        self.model, self.files = model, files
        self.used: set[str] = set()
        self.loaded: dict[str, torch.Tensor] = {}

    def take(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` (cast to ``dtype`` if given); names stored once for several (tied
        weights) give one tensor."""
        self.used.add(name)
        stored = self.files.aliases.get(name, name)
        if stored not in self.loaded:
            self.loaded[stored] = self.files.get(stored)
        if dtype is not None and self.loaded[stored].dtype != dtype:
            self.loaded[stored] = self.loaded[stored].to(dtype)
        return self.loaded[stored]

    def take_weight(self, name: str, expected: torch.Size) -> torch.Tensor:
        """The FP8 weight ``name``, checked against the shape of the model's layer."""
        weight = self.take(name)
        if weight.shape != expected:
            raise ValueError(
                f"{self.files.source}: {name} is {list(weight.shape)} there but {list(expected)} in this "
                f"{type(self.model).__name__} (built with another configuration?)"
            )
        return weight

    def take_scalar(self, name: str) -> torch.Tensor:
        return self.take(name).float().reshape(())

    def is_fp8(self, name: str) -> bool:
        return self.files.stored_dtype(name) == "F8_E4M3"

    def fill_the_rest(self) -> None:
        """Every state-dict tensor not consumed by an FP8 module, straight from the checkpoint."""
        missing, misshapen = [], []
        for name, placeholder in self.model.state_dict().items():
            if name in self.used:
                continue
            if name not in self.files:
                missing.append(name)
            elif self.files.stored_shape(name) != placeholder.shape:
                misshapen.append(f"{name} {list(self.files.stored_shape(name))} (model: {list(placeholder.shape)})")
            else:
                # the dtype the model was built in, as from_pretrained(torch_dtype=...) would give
                _set_tensor(self.model, name, self.take(name, placeholder.dtype if placeholder.is_floating_point() else None))
        if missing:
            raise ValueError(f"{self.files.source} lacks tensors of {type(self.model).__name__}: {shown_names(missing)}")
        if misshapen:
            raise ValueError(
                f"{self.files.source} does not fit this {type(self.model).__name__} (built with another "
                f"configuration?): {shown_names(misshapen)}"
            )
        unused = sorted(set(self.files.file_of) - self.used - set(self.files.aliases.values()))
        if unused:
            logger.warning("%s: %d tensors the model has no place for: %s", self.files.source, len(unused), shown_names(unused))
        still_meta = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if still_meta:
            raise ValueError(f"{self.files.source} left tensors of {type(self.model).__name__} unset: {shown_names(still_meta)}")


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            yield name, module


def _load_own(loader: _Loader, metadata: dict[str, str]) -> QuantizationReport:
    model = loader.model
    if metadata.get("model_class") != type(model).__name__:
        raise ValueError(f"{loader.files.source} holds a {metadata.get('model_class')}, not a {type(model).__name__}")
    loader.files.aliases = json.loads(metadata["aliases"])
    modules = json.loads(metadata["modules"])
    for name, entry in tqdm(modules.items(), desc="loading FP8 modules", unit="module", disable=None, leave=False):
        module = model.get_submodule(name)
        if entry["kind"] == "experts":
            fp8 = {w: (loader.take(f"{name}.{w}"), loader.take(f"{name}.{w}_scale")) for w in EXPERT_WEIGHTS if f"{name}.{w}_scale" in loader.files}
            Fp8Experts.from_quantized(module, fp8, fast_accum=entry["fast_accum"])
        elif entry["kind"] == "block":
            weight = loader.take_weight(f"{name}.weight", module.weight.shape)
            BlockScaledLinear.from_blocks(module, weight, loader.take(f"{name}.weight_scale"), entry["block_size"])
        else:
            input_scale = loader.take(f"{name}.input_scale") if f"{name}.input_scale" in loader.files else None
            ScaledLinear.from_quantized(
                module, loader.take_weight(f"{name}.weight", module.weight.shape), loader.take(f"{name}.weight_scale"), input_scale,
                quantize_input=entry["quantize_input"], granularity=entry["granularity"], fast_accum=entry["fast_accum"],
            )
    loader.fill_the_rest()
    return QuantizationReport.from_dict(json.loads(metadata["report"]))


def _bf16_bytes(module: nn.Linear) -> int:
    return 2 * (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0))


def _load_public(loader: _Loader, quant: dict[str, Any]) -> QuantizationReport:
    """ModelOpt FP8 or block-FP8: FP8 linears by their e4m3 weights, the rest as stored."""
    block = quant.get("weight_block_size")
    excluded = quant.get("exclude_modules") or quant.get("ignore") or quant.get("modules_to_not_convert") or []
    label = f"block {block[0]}x{block[1]}, from the checkpoint" if block else "static activation scale, from the checkpoint"
    report = QuantizationReport(config={"checkpoint": quant})
    plans = list(_linears(loader.model))
    for name, module in tqdm(plans, desc="loading FP8 layers", unit="layer", disable=None, leave=False):
        n, k = module.out_features, module.in_features
        if not loader.is_fp8(f"{name}.weight"):
            # the exclude lists of these formats are globs over the whole layer name
            is_excluded = any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded)
            reason = "excluded by the checkpoint" if is_excluded else "not quantized in the checkpoint"
            report.layers.append(LayerReport(name, n, k, Decision.BF16, reason))
            continue
        report.bytes_before += _bf16_bytes(module)
        weight = loader.take_weight(f"{name}.weight", module.weight.shape)
        if block:
            BlockScaledLinear.from_blocks(module, weight, loader.take(f"{name}.weight_scale_inv").float(), block)
        else:
            ScaledLinear.from_quantized(
                module, weight, loader.take_scalar(f"{name}.weight_scale"), loader.take_scalar(f"{name}.input_scale"),
                quantize_input=True, granularity="per_tensor", fast_accum=True,
            )
        loader.used.add(f"{name}.weight_scale")  # our name for a block checkpoint's weight_scale_inv
        report.layers.append(LayerReport(name, n, k, Decision.FP8, label))
    loader.fill_the_rest()
    for layer in report.by_decision(Decision.FP8):
        module = loader.model.get_submodule(layer.name)
        report.bytes_after += tensor_bytes(module.weight, module.weight_scale, module.input_scale, module.bias)
    return report


def load_quantized(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> QuantizationReport:
    """Fill ``model`` (best built under :func:`skeleton`) from an FP8 checkpoint on ``device``.

    ``path`` is a file written by :func:`save_quantized`, or a ModelOpt FP8 / block-FP8
    checkpoint folder. Returns the quantization report, which is also attached to ``model``
    (``fp8_compile.quantization_report``). Raises ValueError naming the checkpoint when it
    does not fit the model.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no FP8 checkpoint at {str(path)!r}")
    model = getattr(model, "_orig_mod", model)
    metadata = _metadata(path)
    quant = quantization_config(path)
    own = metadata.get("format") == FORMAT
    modelopt = quant.get("quant_method") == "modelopt" and quant.get("quant_algo") == "FP8"
    block_fp8 = quant.get("quant_method") == "fp8" and bool(quant.get("weight_block_size"))
    if not (own or modelopt or block_fp8):
        raise ValueError(
            f"{str(path)!r} is not an FP8 checkpoint this package reads: expected a file from save_quantized, "
            "a ModelOpt FP8 export (quant_algo 'FP8') or a block-FP8 checkpoint (quant_method 'fp8' with "
            f"weight_block_size); its quantization config is {quant or 'missing'}"
        )
    files = CheckpointFiles.open(path, device)
    try:
        loader = _Loader(model, files)
        report = _load_own(loader, metadata) if own else _load_public(loader, quant)
    finally:
        files.close()
    model.to(device)  # the buffers built at construction; loaded tensors are there already
    # The layers the checkpoint keeps in BF16 are decided: compiling with omni_fp8 must not
    # quantize them as layers no conversion has seen yet.
    for layer in report.by_decision(Decision.BF16):
        weight = getattr(model.get_submodule(layer.name), "weight", None)
        if isinstance(weight, nn.Parameter):
            keep_weights([weight], layer.reason)
    logger.info("omni_fp8 %s loaded from %s: %s", type(model).__name__, path, report.summary())
    return record_report(model, report)
