"""Tests of hurmacl_kit.metrics against values derived by hand.

The surface of a mask is the set of its voxels that have a background voxel
among their 6 face neighbours. Distances are Euclidean between voxel centres,
scaled by the spacing of each axis. With P the prediction and G the ground
truth, ASSD pools both directed distance sets:
(sum d(P->G) + sum d(G->P)) / (|dP| + |dG|).
"""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice

from hurmacl_kit import metrics
from hurmacl_kit.metrics import OrganScore

SPACING = (2.0, 1.0, 3.0)
LABELS = {"background": 0, "Brainstem": 1}


def _label_map(shape=(10, 10, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def _only_score(prediction, ground_truth, spacing=SPACING) -> OrganScore:
    scores = metrics.score_case(prediction, ground_truth, spacing, LABELS)
    assert len(scores) == 1
    return scores[0]


def test_identical_masks_score_perfectly():
    ground_truth = _label_map()
    ground_truth[2:6, 3:7, 1:5] = 1

    score = _only_score(ground_truth.copy(), ground_truth)

    assert score.organ == "Brainstem"
    assert score.status == "ok"
    assert score.dice == 1.0
    assert score.assd_mm == 0.0


def test_cube_shifted_one_voxel_anisotropic():
    # G is the 4x4x4 cube [2:6]^3 and P the same cube moved one voxel along
    # axis 0, where the spacing is 2 mm.
    #
    # Dice: the overlap is 3x4x4 = 48 voxels, so 2*48 / (64+64) = 0.75.
    #
    # ASSD: each cube has 64 - 8 = 56 surface voxels (the 2x2x2 core is
    # interior). Distances from the surface of G to the surface of P:
    #   * plane x=2 (16 voxels): the nearest P voxel is one step along axis 0,
    #     so 2 mm each, 32 mm in total.
    #   * plane x=5, 12 voxels on the y or z rim: they are P surface voxels too,
    #     so 0 mm.
    #   * plane x=5, 4 voxels with y, z in {3, 4}: P is interior there. The
    #     nearest P surface voxel is one step along axis 1 (1 mm), which beats
    #     axis 0 (2 mm) and axis 2 (3 mm), so 4 mm in total.
    #   * planes x=3 and x=4, 24 rim voxels: also P surface voxels, so 0 mm.
    # The sum is 36 mm over 56 voxels, and P to G is the mirror image, so
    # ASSD = (36 + 36) / (56 + 56) = 9/14 mm. With the spacing applied in the
    # reverse axis order, the x=2 plane would give 3 mm each and ASSD 13/14 mm.
    ground_truth = _label_map()
    ground_truth[2:6, 2:6, 2:6] = 1
    prediction = _label_map()
    prediction[3:7, 2:6, 2:6] = 1

    score = _only_score(prediction, ground_truth)

    assert score.status == "ok"
    assert score.dice == pytest.approx(0.75)
    assert score.assd_mm == pytest.approx(9 / 14, rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slab_shift_distance_is_half_spacing(axis):
    # G is a slab two voxels thick along `axis` and P the same slab moved one
    # voxel along it. Every voxel of a two-voxel-thick slab is a surface voxel.
    # Half of each surface lies in the other mask (0 mm) and the other half is
    # one step from it (spacing[axis] mm), so ASSD = spacing[axis] / 2.
    # Dice is 2 * (one plane) / (four planes) = 0.5.
    ground_truth = _label_map()
    prediction = _label_map()
    ground_region = [slice(1, 5)] * 3
    prediction_region = [slice(1, 5)] * 3
    ground_region[axis] = slice(2, 4)
    prediction_region[axis] = slice(3, 5)
    ground_truth[tuple(ground_region)] = 1
    prediction[tuple(prediction_region)] = 1

    score = _only_score(prediction, ground_truth)

    assert score.dice == pytest.approx(0.5)
    assert score.assd_mm == pytest.approx(SPACING[axis] / 2, rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_cropping_matches_full_volume_monai():
    # score_case crops to the union bounding box before calling MONAI. The
    # result must equal MONAI on the full arrays, also for a mask that
    # touches the array border.
    grid = np.indices((12, 14, 9))
    ground_truth = _label_map((12, 14, 9))
    prediction = _label_map((12, 14, 9))
    ground_truth[((grid[0] - 5) ** 2 + (grid[1] - 6) ** 2 + (grid[2] - 4) ** 2) <= 16] = 1
    prediction[((grid[0] - 2) ** 2 + (grid[1] - 8) ** 2 + (grid[2] - 5) ** 2) <= 20] = 1

    score = _only_score(prediction, ground_truth)

    prediction_tensor = torch.from_numpy(prediction == 1)[None, None]
    ground_truth_tensor = torch.from_numpy(ground_truth == 1)[None, None]
    expected_dice = compute_dice(prediction_tensor, ground_truth_tensor, include_background=True).item()
    expected_assd = compute_average_surface_distance(
        prediction_tensor, ground_truth_tensor, include_background=True, symmetric=True, spacing=SPACING
    ).item()
    assert score.dice == pytest.approx(expected_dice)
    assert score.assd_mm == pytest.approx(expected_assd)


def test_assd_pools_both_directions():
    # G is the single plane x=2 and P the planes x=2 and x=3, both over
    # y, z in [1, 5): 16 and 32 voxels, all of them surface voxels.
    # G to P: every G voxel lies in P, so 16 distances of 0 mm.
    # P to G: plane x=2 gives 16 distances of 0 mm and plane x=3 gives 16 of
    # 2 mm (one step along axis 0).
    # Pooled ASSD = 32 mm / (16 + 32) = 2/3 mm. The mean of the two directed
    # means would be (0 + 1) / 2 = 0.5 mm, and P to G alone 1 mm.
    # Dice = 2*16 / (16+32) = 2/3.
    ground_truth = _label_map()
    ground_truth[2, 1:5, 1:5] = 1
    prediction = _label_map()
    prediction[2:4, 1:5, 1:5] = 1

    score = _only_score(prediction, ground_truth)

    assert score.dice == pytest.approx(2 / 3)
    assert score.assd_mm == pytest.approx(2 / 3, rel=1e-6)


def test_numpy_spacing_is_accepted():
    ground_truth = _label_map()
    ground_truth[2:6, 2:6, 2:6] = 1
    prediction = _label_map()
    prediction[3:7, 2:6, 2:6] = 1

    score = _only_score(prediction, ground_truth, spacing=np.array(SPACING, dtype=np.float32))

    assert score.assd_mm == pytest.approx(9 / 14, rel=1e-6)


def test_missing_in_prediction_status():
    ground_truth = _label_map()
    ground_truth[2:6, 2:6, 2:6] = 1

    score = _only_score(_label_map(), ground_truth)

    assert score.status == "missing_in_prediction"
    assert score.dice == 0.0
    assert score.assd_mm is None


def test_missing_in_ground_truth_status():
    prediction = _label_map()
    prediction[2:6, 2:6, 2:6] = 1

    score = _only_score(prediction, _label_map())

    assert score.status == "missing_in_ground_truth"
    assert score.dice is None
    assert score.assd_mm is None


def test_missing_in_both_status():
    score = _only_score(_label_map(), _label_map())

    assert score.status == "missing_in_both"
    assert score.dice is None
    assert score.assd_mm is None


def test_score_case_emits_no_warnings():
    # MONAI warns on empty masks and on its own deprecated argument. Organ A
    # is missing in the ground truth, B in the prediction, C in both, and D
    # is scored by MONAI.
    prediction = _label_map()
    prediction[2:6, 2:6, 2:6] = 1
    prediction[7:9, 7:9, 7:9] = 4
    ground_truth = _label_map()
    ground_truth[2:6, 2:6, 2:6] = 2
    ground_truth[6:9, 7:9, 7:9] = 4
    labels = {"background": 0, "A": 1, "B": 2, "C": 3, "D": 4}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = metrics.score_case(prediction, ground_truth, SPACING, labels)

    assert [score.status for score in scores] == [
        "missing_in_ground_truth",
        "missing_in_prediction",
        "missing_in_both",
        "ok",
    ]
    assert [str(warning.message) for warning in caught] == []


def test_multiple_organs_follow_labels():
    ground_truth = _label_map()
    ground_truth[1:4, 1:4, 1:4] = 1
    ground_truth[6:9, 6:9, 6:9] = 2
    prediction = ground_truth.copy()
    prediction[6:9, 6:9, 6:9] = 0
    prediction[7:9, 6:9, 6:9] = 2
    prediction[0, 0, 0] = 7
    labels = {"background": 0, "Mandible": 1, "SpinalCord": 2}

    scores = metrics.score_case(prediction, ground_truth, SPACING, labels)

    assert [score.organ for score in scores] == ["Mandible", "SpinalCord"]
    assert scores[0].dice == 1.0
    assert scores[0].assd_mm == 0.0
    # SpinalCord: 18 of 27 voxels predicted, so Dice = 2*18 / (27+18) = 0.8.
    assert scores[1].dice == pytest.approx(0.8)
    assert scores[1].assd_mm > 0.0


@pytest.mark.parametrize(
    ("prediction_shape", "ground_truth_shape", "match"),
    [
        ((10, 10, 10), (10, 10, 9), "Shape mismatch"),
        ((10, 10), (10, 10), "expected a 3D"),
        ((1, 10, 10, 10), (1, 10, 10, 10), "expected a 3D"),
    ],
)
def test_invalid_shapes_raise(prediction_shape, ground_truth_shape, match):
    with pytest.raises(ValueError, match=match):
        metrics.score_case(np.zeros(prediction_shape, np.uint8), np.zeros(ground_truth_shape, np.uint8), SPACING, LABELS)


@pytest.mark.parametrize(
    "spacing",
    [(-1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (1.0, math.nan, 1.0), (1.0, 1.0, math.inf), (1.0, 1.0), (1.0, 1.0, 1.0, 1.0)],
)
def test_invalid_spacing_raises(spacing):
    label_map = _label_map()

    with pytest.raises(ValueError, match="Invalid spacing"):
        metrics.score_case(label_map, label_map, spacing, LABELS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, bool])
def test_non_integer_label_maps_raise(dtype):
    label_map = _label_map()

    with pytest.raises(ValueError, match="expected an integer label map"):
        metrics.score_case(label_map.astype(dtype), label_map, SPACING, LABELS)
    with pytest.raises(ValueError, match="expected an integer label map"):
        metrics.score_case(label_map, label_map.astype(dtype), SPACING, LABELS)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"background": 0}, "contains no organ"),
        ({"Brainstem": 1, "Larynx": 1}, "used by both"),
        ({"Brainstem": 1.0}, "expected an integer"),
        ({"Brainstem": 300}, "outside the range of dtype uint8"),
    ],
)
def test_invalid_labels_raise(labels, match):
    label_map = _label_map()

    with pytest.raises(ValueError, match=match):
        metrics.score_case(label_map, label_map, SPACING, labels)


def test_organ_score_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="Invalid status"):
        OrganScore("Brainstem", 0.5, 1.0, "partial")
    with pytest.raises(ValueError, match="do not match status"):
        OrganScore("Brainstem", None, 1.0, "ok")
    with pytest.raises(ValueError, match="do not match status"):
        OrganScore("Brainstem", 0.0, None, "missing_in_ground_truth")
    with pytest.raises(ValueError, match="must be 0.0"):
        OrganScore("Brainstem", 0.3, None, "missing_in_prediction")
    with pytest.raises(ValueError, match="Invalid Dice"):
        OrganScore("Brainstem", math.nan, 1.0, "ok")
    with pytest.raises(ValueError, match="Invalid ASSD"):
        OrganScore("Brainstem", 0.5, math.inf, "ok")


def _example_per_case() -> dict[str, list[OrganScore]]:
    return {
        "case_a": [
            OrganScore("Brainstem", 0.8, 1.0, "ok"),
            OrganScore("Parotid_L", None, None, "missing_in_ground_truth"),
            OrganScore("Cochlea_L", None, None, "missing_in_both"),
        ],
        "case_b": [
            OrganScore("Brainstem", 0.0, None, "missing_in_prediction"),
            OrganScore("Parotid_L", 0.6, 4.0, "ok"),
            OrganScore("Cochlea_L", None, None, "missing_in_both"),
        ],
        "case_c": [
            OrganScore("Brainstem", 0.9, 3.0, "ok"),
            OrganScore("Parotid_L", None, None, "missing_in_both"),
        ],
    }


def test_summary_skips_undefined_scores():
    summary = metrics.summarize(_example_per_case())
    brainstem = summary["organs"]["Brainstem"]
    parotid = summary["organs"]["Parotid_L"]
    cochlea = summary["organs"]["Cochlea_L"]

    assert summary["case_ids"] == ["case_a", "case_b", "case_c"]
    assert list(summary["organs"]) == ["Brainstem", "Parotid_L", "Cochlea_L"]

    # Brainstem Dice over all three cases, the missed one counting as 0.0.
    assert brainstem["dice_mean"] == pytest.approx(1.7 / 3)
    assert brainstem["dice_std"] == pytest.approx(np.std([0.8, 0.0, 0.9]))
    assert brainstem["dice_count"] == 3
    # Brainstem ASSD only where defined: mean of 1 and 3, population std 1.
    assert brainstem["assd_mm_mean"] == pytest.approx(2.0)
    assert brainstem["assd_mm_std"] == pytest.approx(1.0)
    assert brainstem["assd_mm_count"] == 2

    # Parotid_L has one defined case, not three with zeros.
    assert parotid["dice_mean"] == pytest.approx(0.6)
    assert parotid["dice_std"] == 0.0
    assert parotid["dice_count"] == 1
    assert parotid["assd_mm_mean"] == pytest.approx(4.0)

    assert cochlea["dice_mean"] is None
    assert cochlea["dice_std"] is None
    assert cochlea["assd_mm_mean"] is None
    assert cochlea["dice_count"] == 0


def test_summary_counts_statuses():
    summary = metrics.summarize(_example_per_case())

    assert summary["organs"]["Brainstem"]["status_counts"] == {
        "ok": 2,
        "missing_in_ground_truth": 0,
        "missing_in_prediction": 1,
        "missing_in_both": 0,
    }
    assert summary["organs"]["Parotid_L"]["status_counts"] == {
        "ok": 1,
        "missing_in_ground_truth": 1,
        "missing_in_prediction": 0,
        "missing_in_both": 1,
    }
    assert summary["organs"]["Cochlea_L"]["status_counts"]["missing_in_both"] == 2


def test_summary_mean_over_organs():
    summary = metrics.summarize(_example_per_case())

    # Cochlea_L has no defined score, so it must not pull the means to 0.
    assert summary["mean_dice"] == pytest.approx((1.7 / 3 + 0.6) / 2)
    assert summary["mean_assd_mm"] == pytest.approx((2.0 + 4.0) / 2)


def test_summary_is_strict_json():
    summary = metrics.summarize(_example_per_case())

    text = json.dumps(summary, allow_nan=False)

    assert json.loads(text) == summary


def test_summary_of_no_cases():
    summary = metrics.summarize({})

    assert summary == {"case_ids": [], "organs": {}, "mean_dice": None, "mean_assd_mm": None}


def test_summary_rejects_duplicate_organ():
    per_case = {"case_a": [OrganScore("Brainstem", 0.8, 1.0, "ok"), OrganScore("Brainstem", 0.7, 2.0, "ok")]}

    with pytest.raises(ValueError, match="twice"):
        metrics.summarize(per_case)


def test_per_case_csv_round_trip(tmp_path):
    path = tmp_path / "results" / "per_case.csv"
    per_case = {
        "case_a": [OrganScore("Brainstem", 2 / 3, 9 / 14, "ok")],
        "case_b": [
            OrganScore("Brainstem", 0.0, None, "missing_in_prediction"),
            OrganScore("Parotid_L", None, None, "missing_in_ground_truth"),
        ],
    }

    metrics.write_per_case_csv(path, per_case)

    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["case_id", "organ", "dice", "assd_mm", "status"]
    assert len(rows) == 3
    assert rows[0] == {"case_id": "case_a", "organ": "Brainstem", "dice": repr(2 / 3), "assd_mm": repr(9 / 14), "status": "ok"}
    assert float(rows[0]["dice"]) == 2 / 3
    assert rows[1]["dice"] == "0.0"
    assert rows[1]["assd_mm"] == ""
    assert rows[2]["dice"] == ""
    assert rows[2]["assd_mm"] == ""
    assert rows[2]["status"] == "missing_in_ground_truth"
    assert [entry.name for entry in path.parent.iterdir()] == ["per_case.csv"]
