"""The support table (docs/support.md and docs/support.json), generated from validation runs.

    python -m fp8_compile.validation.support_table --out docs
    python -m fp8_compile.validation.support_table --out docs --extra-reports runs/*/report.json

Every denoiser of ``fp8_compile.zoo`` is validated on its tiny random config, and our trained
digits model on its real weights, each against a PSNR target; reports of other runs (e.g.
full-size random weights on a GPU) are added with ``--extra-reports``. Each row says on what it
was validated; models that cannot run here are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp8_compile.validation.api import validate
from fp8_compile.validation.report import ValidationReport, json_safe

logger = logging.getLogger("fp8_compile")

DEFAULT_TARGET_PSNR = 30.0  # public FP8 DiT work calls 30-33 dB against BF16 good
ONLINE = "yes"
PRE_CALIBRATED = "no"
OPT_IN = "opt-in, not measured here"
LEGEND = [
    "- **online**: the BF16 checkpoint is converted to FP8 at load time (`quantize_` or the first compiled "
    "call), with dynamic activation scales; nothing to prepare.",
    "- **pre-calibrated**: whether static activation scales ship for the model (none do; calibrate your own "
    "for `activation_scheme=\"static\"`).",
    "- **ignored_layers**: *measured* is the smallest list the validation found to reach the target on the "
    "weights it ran (see *validated on*); *documented* is what users of the real checkpoint recommend.",
    '- **text-encoder quantization**: text encoders are quantized only when asked '
    '(`Omni(..., quantization_config={"text_encoder": {...}})`); this table does not measure them.',
    "- **validated on**: PSNR and SSIM of the final images (for the zoo denoisers, which have no VAE, of the "
    "final latent over its own value range, which reads higher than pixel PSNR for the same relative error) "
    "and the lowest output SQNR of any quantized layer.",
]


@dataclass(frozen=True)
class SupportEntry:
    model: str
    hf_ids: tuple[str, ...]
    subject: str | None  # what validate() runs: a zoo name or "digits"; None: cannot run here
    text_encoders: str  # the model's text encoder(s) and how omni_fp8 treats them
    documented_ignored: tuple[str, ...] = ()  # ignore patterns recommended by the model's users
    not_run_reason: str = ""


ENTRIES: tuple[SupportEntry, ...] = (
    SupportEntry("FLUX.1", ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"), "flux",
                 f"T5-XXL + CLIP-L: {OPT_IN}"),
    SupportEntry("FLUX.2 [klein]", ("black-forest-labs/FLUX.2-klein-4B",), "flux2_klein", f"Qwen3-4B: {OPT_IN}"),
    SupportEntry("Qwen-Image", ("Qwen/Qwen-Image",), "qwen_image", f"Qwen2.5-VL-7B: {OPT_IN}",
                 documented_ignored=("img_mlp",)),
    SupportEntry("Wan2.2 T2V A14B", ("Wan-AI/Wan2.2-T2V-A14B-Diffusers",), "wan", f"UMT5-XXL: {OPT_IN}"),
    SupportEntry("Z-Image-Turbo", ("Tongyi-MAI/Z-Image-Turbo",), "z_image", f"Qwen3-4B: {OPT_IN}"),
    SupportEntry("HunyuanVideo-1.5", ("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",), "hunyuan_video15",
                 f"Qwen2.5-VL-7B + ByT5: {OPT_IN}"),
    SupportEntry("GLM-Image (diffusion decoder)", ("zai-org/GLM-Image",), "glm_image", f"T5 (ByT5) + GLM-Image AR model: {OPT_IN}"),
    SupportEntry("digits DiT (ours, DiTTransformer2DModel)", ("ships in fp8_compile/assets/digits_dit",), "digits",
                 "none (class labels)"),
    SupportEntry("HunyuanImage-3.0", ("tencent/HunyuanImage-3.0",), None, "-",
                 not_run_reason="remote code only (diffusers' HunyuanImage classes are 2.1); cannot be imported here"),
    SupportEntry("BAGEL", ("ByteDance-Seed/BAGEL-7B-MoT",), None, "-",
                 not_run_reason="its own repository only, no diffusers or transformers class"),
    SupportEntry("Qwen3-TTS", ("Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice", "Qwen/Qwen3-TTS-12Hz-0.6B-Base"), None, "-",
                 not_run_reason="its package pins transformers 4.57 and fails to import with transformers 5"),
)


def run_summary(report: ValidationReport | dict[str, Any]) -> dict[str, Any]:
    """The figures a row shows, from a report object or its JSON."""
    data = report.to_dict() if isinstance(report, ValidationReport) else report
    quantized = [layer for layer in data["layers"] if layer["decision"] != "bf16"]
    weakest = min(quantized, key=lambda layer: _number(layer["output_sqnr_db"]), default=None)
    suggestion = data.get("suggestion") or {}
    return {
        "model": data["model"],
        "validated_on": data["validated_on"],
        "device": data["device"],
        "psnr_db": _number(data["image"]["psnr_db"]),
        "ssim": data["image"]["ssim"],
        "weakest_layer": weakest["name"] if weakest else None,
        "weakest_layer_sqnr_db": _number(weakest["output_sqnr_db"]) if weakest else None,
        "first_collapse": data.get("first_collapse"),
        "target_psnr_db": suggestion.get("target_psnr_db"),
        "target_met": suggestion.get("met"),
        "ignored_layers": suggestion.get("ignored_layers"),
    }


def _number(value: float | str) -> float:
    return float(value)  # JSON keeps Inf as the string "inf"


def validate_entries(entries: Sequence[SupportEntry], target_psnr: float) -> dict[str, list[dict[str, Any]]]:
    """One validation run per runnable entry; the summaries by subject name."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry.subject is not None:
            logger.info("support table: validating %s", entry.model)
            runs.setdefault(entry.subject, []).append(run_summary(validate(entry.subject, target_psnr=target_psnr)))
    return runs


def load_extra_reports(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        try:
            summary = run_summary(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path} is not a validation report.json: {e}") from None
        runs.setdefault(summary["model"], []).append(summary)
    return runs


def _recommendation(runs: list[dict[str, Any]]) -> str:
    """From the last run listed: generated runs first, then the extra reports (larger models)."""
    last = runs[-1]
    if last["first_collapse"]:
        verdict = f"bf16: layer {last['first_collapse']} collapses in FP8"
    elif last["target_psnr_db"] is None:
        verdict = "no verdict: the run had no target PSNR (validate --target-psnr)"
    elif last["target_met"] and not last["ignored_layers"]:
        verdict = "fp8"
    elif last["target_met"]:
        verdict = "fp8 with the ignored_layers shown"
    else:
        verdict = f"bf16: FP8 stays below {last['target_psnr_db']:g} dB"
    if all(run["validated_on"] != "our trained model" for run in runs):
        verdict += "; random weights only: re-validate on the real checkpoint"
    return verdict


def _validated_on(run: dict[str, Any]) -> str:
    psnr = f"{run['psnr_db']:.1f} dB" if math.isfinite(run["psnr_db"]) else "exact"
    layer = f", weakest layer {run['weakest_layer_sqnr_db']:.1f} dB" if run["weakest_layer"] else ""
    return f"{run['validated_on']} ({run['device']}): PSNR {psnr}, SSIM {run['ssim']:.3f}{layer}"


def build_rows(entries: Sequence[SupportEntry], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for entry in entries:
        entry_runs = runs.get(entry.subject, []) if entry.subject else []
        row: dict[str, Any] = {"model": entry.model, "hf_ids": list(entry.hf_ids),
                               "text_encoder_quantization": entry.text_encoders, "runs": entry_runs}
        if not entry_runs:
            reason = entry.not_run_reason or "no validation run yet"
            row.update(online="-", pre_calibrated="-", recommendation=f"not validated: {reason}",
                       ignored_layers=None, validated_on=[])
        else:
            measured = entry_runs[-1]["ignored_layers"] or []
            row.update(online=ONLINE, pre_calibrated=PRE_CALIBRATED, recommendation=_recommendation(entry_runs),
                       ignored_layers={"measured": measured, "documented": list(entry.documented_ignored)},
                       validated_on=[_validated_on(run) for run in entry_runs])
        rows.append(row)
    unmatched = sorted(set(runs) - {entry.subject for entry in entries})
    if unmatched:
        logger.warning("support table: reports of %s match no entry of the table and are left out", unmatched)
    return rows


def _cell(row: dict[str, Any]) -> str:
    ignored = row["ignored_layers"]
    if ignored is None:
        return "-"
    text = f"`{ignored['measured']}` (measured)"
    if ignored["documented"]:
        text += f"; `{ignored['documented']}` (documented for real weights)"
    return text


def to_markdown(rows: list[dict[str, Any]], target_psnr: float) -> str:
    lines = [
        "# Supported models",
        "",
        "Generated by `python -m fp8_compile.validation.support_table` from FP8-vs-BF16 validation runs "
        f"(`python -m fp8_compile.validate`, target PSNR {target_psnr:g} dB against BF16; see "
        "[validation.md](validation.md)). *Validated on* says what each row rests on: a tiny random "
        "config, full-size random weights, or our trained model. Random weights have none of the "
        "outlier structure of trained ones, so a random-weight row shows that the model runs in FP8 "
        "and where its error grows, not that its real checkpoint keeps its quality.",
        "",
        "| model | HF ids | online | pre-calibrated | recommendation | ignored_layers | text-encoder quantization "
        "| validated on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ids = "<br>".join(f"`{i}`" for i in row["hf_ids"])
        validated = "<br>".join(row["validated_on"]) or "not validated"
        lines.append(
            f"| {row['model']} | {ids} | {row['online']} | {row['pre_calibrated']} | {row['recommendation']} | "
            f"{_cell(row)} | {row['text_encoder_quantization']} | {validated} |"
        )
    return "\n".join([*lines, "", *LEGEND]) + "\n"


def write_support_table(out_dir: Path, rows: list[dict[str, Any]], target_psnr: float) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, data = out_dir / "support.md", out_dir / "support.json"
    markdown.write_text(to_markdown(rows, target_psnr))
    payload = json_safe({"target_psnr_db": target_psnr, "rows": rows})
    data.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return markdown, data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--target-psnr", type=float, default=DEFAULT_TARGET_PSNR)
    parser.add_argument("--extra-reports", type=Path, nargs="*", default=[],
                        help="report.json files of other validation runs (e.g. full size on a GPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = validate_entries(ENTRIES, args.target_psnr)
    for name, extra in load_extra_reports(args.extra_reports).items():
        runs.setdefault(name, []).extend(extra)
    markdown, data = write_support_table(args.out, build_rows(ENTRIES, runs), args.target_psnr)
    print(f"wrote {markdown} and {data}")


if __name__ == "__main__":
    main()
