"""Evaluation on held-out cases: 3D per-organ Dice and ASSD, a per-case CSV and a summary JSON."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import nibabel as nib
import torch
from tqdm.auto import tqdm

from hurmacl_kit import data, metrics
from hurmacl_kit.engine.checkpoint import load_model
from hurmacl_kit.engine.predict import predict_case, save_like
from hurmacl_kit.engine.train import resolve_device
from hurmacl_kit.io import atomic_write_json

logger = logging.getLogger(__name__)

SUMMARY_NAME = "metrics_summary.json"
PER_CASE_NAME = "metrics_per_case.csv"


def evaluate(
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    case_ids: list[str] | None = None,
    save_predictions: int = 1,
    device: str = "auto",
    inference_rule: str | None = None,
    threshold: float | None = None,
) -> dict:
    """Segment held-out cases, score them and write the metric files.

    Args:
        checkpoint: Checkpoint written by training.
        data_root: Dataset in the raw layout.
        output_dir: Folder for ``metrics_summary.json``, ``metrics_per_case.csv``
            and ``predictions/``.
        split: Split of ``dataset.json`` to evaluate, unless ``case_ids`` is given.
        case_ids: Explicit cases to evaluate.
        save_predictions: Number of cases whose label and uncertainty NIfTI are written.
        device: "auto", "cpu" or "cuda".
        inference_rule: Override the model's inference rule.
        threshold: Override the model's uncertainty threshold T.

    Returns:
        The summary written to ``metrics_summary.json``.
    """
    model, state = load_model(checkpoint, device=resolve_device(device))
    if inference_rule is not None:
        model.config.inference_rule = inference_rule
    if threshold is not None:
        model.config.threshold = threshold
    model.config.validate()
    context = int(state["train_config"]["context"])

    info = data.load_dataset_info(data_root)
    case_ids = case_ids or info.splits.get(split)
    if not case_ids:
        raise ValueError(f"split {split!r} is missing or empty in {info.root / 'dataset.json'}; available: {sorted(info.splits)}")
    organ_labels = {name: value for name, value in info.labels.items() if name != metrics.BACKGROUND_NAME}

    output_dir = Path(output_dir)
    per_case, hard_fractions = {}, {}
    started = time.perf_counter()
    for index, case_id in enumerate(tqdm(case_ids, desc="evaluate")):
        case = data.load_dataset_case(info, case_id)
        prediction = predict_case(model, case, context=context)
        per_case[case_id] = metrics.score_case(prediction.labels, case.label, case.spacing, organ_labels)
        hard_fractions[case_id] = prediction.hard_fraction
        if index < save_predictions:
            _save_prediction(info, case_id, prediction, output_dir / "predictions")
        _log_case(case_id, per_case[case_id])

    summary = metrics.summarize(per_case)
    summary.update(
        split=split,
        checkpoint=str(checkpoint),
        step=state.get("step"),
        hard_fraction=hard_fractions,
        seconds=round(time.perf_counter() - started, 1),
        device=str(next(model.parameters()).device),
        torch_version=torch.__version__,
        model_config=model.config.to_dict(),
        train_config=state.get("train_config"),
    )
    metrics.write_per_case_csv(output_dir / PER_CASE_NAME, per_case)
    atomic_write_json(output_dir / SUMMARY_NAME, summary)
    logger.info("wrote %s and %s", output_dir / SUMMARY_NAME, output_dir / PER_CASE_NAME)
    return summary


def _save_prediction(info: data.DatasetInfo, case_id: str, prediction, folder: Path) -> None:
    image_path, _ = data.case_paths(info, case_id)
    reference = nib.load(str(image_path))
    save_like(prediction.labels, reference, folder / f"{case_id}_labels.nii.gz")
    save_like(prediction.uncertainty, reference, folder / f"{case_id}_uncertainty.nii.gz")


def _log_case(case_id: str, scores: list) -> None:
    parts = [f"{score.organ}={score.dice:.3f}" if score.dice is not None else f"{score.organ}=n/a" for score in scores]
    logger.info("%s Dice: %s", case_id, " ".join(parts))


def format_summary(summary: dict) -> str:
    """Render a summary as a plain-text table (organ, Dice, ASSD in mm)."""
    lines = [f"{'organ':<14}{'Dice':>8}{'ASSD mm':>10}{'n':>4}"]
    for organ, values in summary["organs"].items():
        dice = values["dice_mean"]
        assd = values["assd_mm_mean"]
        lines.append(
            f"{organ:<14}{_number(dice):>8}{_number(assd):>10}{values['dice_count']:>4}"
        )
    lines.append(f"{'mean':<14}{_number(summary['mean_dice']):>8}{_number(summary['mean_assd_mm']):>10}")
    lines.append(f"cases: {', '.join(summary['case_ids'])}")
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
