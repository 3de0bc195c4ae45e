"""Per-organ Dice and average symmetric surface distance (ASSD) on 3D label maps.

Dice and ASSD come from MONAI 1.6.1 (``monai.metrics.compute_dice`` and
``monai.metrics.compute_average_surface_distance``). This module adds input
checks, a per-organ status for organs that are empty in the ground truth or in
the prediction, a summary over cases and a CSV writer.

Conventions that a radiotherapy reader should know:

* ASSD is in mm. With P the prediction and G the ground truth, it pools the
  distances from each surface voxel of P to the surface of G with those from
  each surface voxel of G to the surface of P. It then takes one mean:
  ``ASSD = (sum d(P->G) + sum d(G->P)) / (|dP| + |dG|)``. When the surfaces
  differ in size, that is not the average of the two directed means.
* A surface voxel is a foreground voxel that has a background voxel among its
  6 face neighbours (``scipy.ndimage.binary_erosion`` with its default
  structuring element, as MONAI 1.6.1 uses it). Distances are Euclidean between
  voxel centres, scaled by the voxel spacing per axis.
* An organ with an empty ground-truth mask is treated as not contoured, not as
  absent from the anatomy. Clinical contour sets often lack an organ that was
  not delineated for that treatment plan, so a prediction there cannot be
  judged and both scores are None.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice

from hurmacl_kit.io import atomic_write_text

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_MISSING_IN_GROUND_TRUTH = "missing_in_ground_truth"
STATUS_MISSING_IN_PREDICTION = "missing_in_prediction"
STATUS_MISSING_IN_BOTH = "missing_in_both"
STATUSES = (
    STATUS_OK,
    STATUS_MISSING_IN_GROUND_TRUTH,
    STATUS_MISSING_IN_PREDICTION,
    STATUS_MISSING_IN_BOTH,
)

BACKGROUND_NAME = "background"
CSV_COLUMNS = ("case_id", "organ", "dice", "assd_mm", "status")


@dataclass(frozen=True)
class OrganScore:
    """Dice and ASSD of one organ in one case.

    The status fixes which scores are defined:

    * ``"ok"``: both masks are non-empty, so ``dice`` and ``assd_mm`` are numbers.
    * ``"missing_in_prediction"``: the ground truth contains the organ and the
      prediction does not. ``dice`` is 0.0, which is the value of
      ``2|P∩G| / (|P|+|G|)`` for an empty P. ``assd_mm`` is None because an
      empty surface has no distance to anything.
    * ``"missing_in_ground_truth"``: only the prediction contains the organ.
      The organ is taken as not contoured, so ``dice`` and ``assd_mm`` are None
      and summaries leave the case out for this organ.
    * ``"missing_in_both"``: ``dice`` and ``assd_mm`` are None.

    Attributes:
        organ: Organ name, as a key of the ``labels`` mapping.
        dice: Dice coefficient in [0, 1], or None where undefined.
        assd_mm: Average symmetric surface distance in mm, or None where undefined.
        status: One of ``STATUSES``.

    Raises:
        ValueError: If the status is unknown, a score is not finite or out of
            range, or the scores do not match the status as listed above.
    """

    organ: str
    dice: float | None
    assd_mm: float | None
    status: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Invalid status {self.status!r} for organ {self.organ!r}. Use one of {STATUSES}.")

        if self.dice is not None and not (math.isfinite(self.dice) and 0.0 <= self.dice <= 1.0):
            raise ValueError(f"Invalid Dice {self.dice!r} for organ {self.organ!r}. Use a number in [0, 1] or None.")

        if self.assd_mm is not None and not (math.isfinite(self.assd_mm) and self.assd_mm >= 0.0):
            raise ValueError(
                f"Invalid ASSD {self.assd_mm!r} mm for organ {self.organ!r}. "
                "Use a finite non-negative number or None."
            )

        expected_dice_defined = self.status in (STATUS_OK, STATUS_MISSING_IN_PREDICTION)
        expected_assd_defined = self.status == STATUS_OK
        if (self.dice is not None) != expected_dice_defined or (self.assd_mm is not None) != expected_assd_defined:
            raise ValueError(
                f"Scores dice={self.dice!r}, assd_mm={self.assd_mm!r} do not match status {self.status!r} "
                f"for organ {self.organ!r}. See the OrganScore docstring for which scores each status defines."
            )

        if self.status == STATUS_MISSING_IN_PREDICTION and self.dice != 0.0:
            raise ValueError(f"Dice must be 0.0 for status {self.status!r}, got {self.dice!r} for organ {self.organ!r}.")


def score_case(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int],
) -> list[OrganScore]:
    """Score every organ of one case with Dice and ASSD.

    Both label maps must lie on the same voxel grid. Label values that
    ``labels`` does not list are ignored.

    Args:
        prediction: Predicted integer label map of shape (X, Y, Z).
        ground_truth: Reference integer label map of the same shape.
        spacing: Voxel size in mm along axes 0, 1 and 2 of the arrays, in that order.
        labels: Organ name to label value. An entry named ``"background"``
            is skipped.

    Returns:
        One ``OrganScore`` per organ, in the order of ``labels``.

    Raises:
        ValueError: If the arrays are not 3D integer arrays of equal shape, or
            the spacing is not three positive finite numbers. Also if
            ``labels`` has no organ, a non-integer value, a repeated value or a
            value outside the range of the array dtype.
    """
    prediction = np.asarray(prediction)
    ground_truth = np.asarray(ground_truth)
    _check_label_maps(prediction, ground_truth)
    spacing_mm = _check_spacing(spacing)
    organ_labels = _check_labels(labels, prediction.dtype, ground_truth.dtype)

    scores = []
    for organ, value in organ_labels.items():
        score = _score_organ(organ, prediction == value, ground_truth == value, spacing_mm)
        logger.debug(
            "Organ %s (label %d): status=%s dice=%s assd_mm=%s", organ, value, score.status, score.dice, score.assd_mm
        )
        scores.append(score)
    return scores


def summarize(per_case: Mapping[str, Sequence[OrganScore]]) -> dict[str, Any]:
    """Summarize organ scores over cases.

    Means and standard deviations use only the cases where a score is defined,
    so undefined scores never count as 0. The standard deviation is the
    population one (``numpy.std`` with ``ddof=0``), so a single case gives 0.0.

    Args:
        per_case: Case id to the scores of that case, as ``score_case`` returns them.

    Returns:
        A JSON-serialisable dict without NaN or infinity::

            {
              "case_ids": [...],              # in the order of per_case
              "organs": {
                "<organ>": {
                  "dice_mean", "dice_std", "dice_count",
                  "assd_mm_mean", "assd_mm_std", "assd_mm_count",
                  "status_counts": {"<status>": int for every status},
                },
              },
              "mean_dice": float | None,      # mean of the per-organ dice_mean
              "mean_assd_mm": float | None,   # mean of the per-organ assd_mm_mean
            }

        Organs appear in the order in which they first occur. A mean or
        standard deviation with no defined value is None. ``mean_dice`` and
        ``mean_assd_mm`` weigh every organ with a defined mean equally, however
        many cases define it.

    Raises:
        ValueError: If one case lists the same organ twice.
    """
    dice_by_organ: dict[str, list[float]] = {}
    assd_by_organ: dict[str, list[float]] = {}
    status_counts_by_organ: dict[str, dict[str, int]] = {}

    for case_id, scores in per_case.items():
        seen_organs: set[str] = set()
        for score in scores:
            if score.organ in seen_organs:
                raise ValueError(f"Case {case_id!r} lists organ {score.organ!r} twice. Keep one score per organ and case.")
            seen_organs.add(score.organ)

            status_counts = status_counts_by_organ.setdefault(score.organ, dict.fromkeys(STATUSES, 0))
            status_counts[score.status] += 1
            dice_values = dice_by_organ.setdefault(score.organ, [])
            assd_values = assd_by_organ.setdefault(score.organ, [])
            if score.dice is not None:
                dice_values.append(score.dice)
            if score.assd_mm is not None:
                assd_values.append(score.assd_mm)

    organs = {}
    for organ, status_counts in status_counts_by_organ.items():
        dice_mean, dice_std = _mean_and_std(dice_by_organ[organ])
        assd_mean, assd_std = _mean_and_std(assd_by_organ[organ])
        organs[organ] = {
            "dice_mean": dice_mean,
            "dice_std": dice_std,
            "dice_count": len(dice_by_organ[organ]),
            "assd_mm_mean": assd_mean,
            "assd_mm_std": assd_std,
            "assd_mm_count": len(assd_by_organ[organ]),
            "status_counts": status_counts,
        }

    organ_dice_means = [entry["dice_mean"] for entry in organs.values() if entry["dice_mean"] is not None]
    organ_assd_means = [entry["assd_mm_mean"] for entry in organs.values() if entry["assd_mm_mean"] is not None]
    return {
        "case_ids": list(per_case.keys()),
        "organs": organs,
        "mean_dice": _mean_and_std(organ_dice_means)[0],
        "mean_assd_mm": _mean_and_std(organ_assd_means)[0],
    }


def write_per_case_csv(path: str | os.PathLike, per_case: Mapping[str, Sequence[OrganScore]]) -> None:
    """Write one CSV row per case and organ, atomically.

    The columns are ``case_id, organ, dice, assd_mm, status``. An undefined
    score is an empty cell. Floats are written with ``repr`` precision, so they
    read back to the same value.

    Args:
        path: Destination file. Its parent folder is created if missing.
        per_case: Case id to the scores of that case, as ``score_case`` returns them.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    row_count = 0
    for case_id, scores in per_case.items():
        for score in scores:
            writer.writerow([case_id, score.organ, _csv_cell(score.dice), _csv_cell(score.assd_mm), score.status])
            row_count += 1

    atomic_write_text(path, buffer.getvalue())
    logger.info("Wrote %d organ scores of %d cases to %s", row_count, len(per_case), path)


def _check_label_maps(prediction: np.ndarray, ground_truth: np.ndarray) -> None:
    for name, array in (("prediction", prediction), ("ground_truth", ground_truth)):
        if array.ndim != 3:
            raise ValueError(
                f"Invalid {name}: expected a 3D (X, Y, Z) label map, got shape {array.shape}. "
                "Score 3D volumes, not slices, and squeeze any batch or channel axis."
            )
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"Invalid {name} dtype {array.dtype}: expected an integer label map. "
                "Take the argmax of probabilities or cast labels with .astype(np.int16) first."
            )

    if prediction.shape != ground_truth.shape:
        raise ValueError(
            f"Shape mismatch: prediction {prediction.shape}, ground_truth {ground_truth.shape}. "
            "Resample the prediction onto the ground-truth grid first."
        )


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(spacing)
    if len(values) != 3:
        raise ValueError(f"Invalid spacing {spacing!r}: expected 3 voxel sizes in mm, one per array axis.")

    for value in values:
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not is_real or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"Invalid spacing {spacing!r}: every voxel size must be a positive finite number of mm, got {value!r}."
            )

    # MONAI 1.6.1 prepare_spacing accepts only Python int or float elements, not numpy.float32.
    return (float(values[0]), float(values[1]), float(values[2]))


def _check_labels(labels: Mapping[str, int], *dtypes: np.dtype) -> dict[str, int]:
    seen_values: dict[int, str] = {}
    for name, value in labels.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"Invalid label value {value!r} for organ {name!r}: expected an integer.")
        if int(value) in seen_values:
            raise ValueError(
                f"Label value {int(value)} is used by both {seen_values[int(value)]!r} and {name!r}. "
                "Give every organ its own label value."
            )
        seen_values[int(value)] = name

        for dtype in dtypes:
            limits = np.iinfo(dtype)
            if not limits.min <= int(value) <= limits.max:
                raise ValueError(
                    f"Label value {int(value)} of organ {name!r} is outside the range of dtype {dtype} "
                    f"[{limits.min}, {limits.max}]. Cast the label maps to a wider integer dtype."
                )

    organ_labels = {name: int(value) for name, value in labels.items() if name != BACKGROUND_NAME}
    if not organ_labels:
        raise ValueError(f"labels {dict(labels)!r} contains no organ besides {BACKGROUND_NAME!r}. Add organ entries.")
    return organ_labels


def _score_organ(
    organ: str, prediction_mask: np.ndarray, ground_truth_mask: np.ndarray, spacing_mm: tuple[float, float, float]
) -> OrganScore:
    in_prediction = bool(prediction_mask.any())
    in_ground_truth = bool(ground_truth_mask.any())

    # MONAI 1.6.1 is never called with an empty mask. For an empty mask it
    # returns ASSD inf (one mask empty) or NaN (both), Dice NaN for an empty
    # ground truth, and it warns each time.
    if not in_ground_truth:
        status = STATUS_MISSING_IN_GROUND_TRUTH if in_prediction else STATUS_MISSING_IN_BOTH
        return OrganScore(organ=organ, dice=None, assd_mm=None, status=status)
    if not in_prediction:
        return OrganScore(organ=organ, dice=0.0, assd_mm=None, status=STATUS_MISSING_IN_PREDICTION)

    # Cropping to the union bounding box keeps the tensors small for organs in
    # large CT volumes. It leaves both scores unchanged, because MONAI 1.6.1
    # crops to the same box (plus one voxel) and treats voxels outside it as background.
    region = _union_bounding_box(prediction_mask, ground_truth_mask)
    prediction_tensor = torch.from_numpy(np.ascontiguousarray(prediction_mask[region]))[None, None]
    ground_truth_tensor = torch.from_numpy(np.ascontiguousarray(ground_truth_mask[region]))[None, None]

    dice = compute_dice(prediction_tensor, ground_truth_tensor, include_background=True)
    # NOTE: ASSD uses the centres of surface voxels, not a sub-voxel surface
    # mesh, so it is not directly comparable with ASSD from mesh-based tools.
    with warnings.catch_warnings():
        # MONAI 1.6.1 passes its own deprecated always_return_as_numpy argument
        # to get_mask_edges, which warns on every call and needs no action here.
        # catch_warnings changes process-wide state, so it is not thread-safe.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        assd = compute_average_surface_distance(
            prediction_tensor, ground_truth_tensor, include_background=True, symmetric=True, spacing=spacing_mm
        )

    return OrganScore(organ=organ, dice=float(dice.item()), assd_mm=float(assd.item()), status=STATUS_OK)


def _union_bounding_box(*masks: np.ndarray) -> tuple[slice, ...]:
    union = np.logical_or.reduce(masks)
    region = []
    for axis in range(union.ndim):
        other_axes = tuple(other for other in range(union.ndim) if other != axis)
        occupied = np.flatnonzero(union.any(axis=other_axes))
        region.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(region)


def _mean_and_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


def _csv_cell(value: float | None) -> str:
    return "" if value is None else repr(value)
