"""2D axial-slice samples from 3D cases, for training and whole-volume inference.

Each sample is one axial slice ``[:, :, z]`` with ``context`` neighbour slices
on each side as extra channels. The module works on ``Case`` arrays only and
does not depend on any model.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hurmacl_kit.data.cases import WINDOW_LOWER_HU, WINDOW_UPPER_HU, Case, window_hu
from hurmacl_kit.data.openkbp import LABELS

logger = logging.getLogger(__name__)

# Augmentation strengths, in units of the windowed [0, 1] intensity.
INTENSITY_SCALE_RANGE = 0.10  # multiply by a factor drawn from [0.9, 1.1]
INTENSITY_SHIFT_RANGE = 0.05  # add an offset drawn from [-0.05, 0.05]
NOISE_STD = 0.01  # Gaussian noise, 10 HU with the default 1000 HU window
FLIP_PROBABILITY = 0.5
FOREGROUND_CROP_PROBABILITY = 2 / 3  # share of training crops centred on an organ voxel

# A left-right flip turns the right parotid into a left one, so the flip swaps
# their labels.
_FLIP_LOOKUP = np.arange(256, dtype=np.uint8)
_FLIP_LOOKUP[LABELS["RightParotid"]] = LABELS["LeftParotid"]
_FLIP_LOOKUP[LABELS["LeftParotid"]] = LABELS["RightParotid"]


class SliceDataset(Dataset):
    """Axial slices of labelled cases with neighbour-slice channels.

    Sample ``index`` is always the same slice, in the order of ``cases`` and
    then of z. The random draws depend only on ``seed``, the epoch set by
    ``set_epoch`` and ``index``, so a run is reproducible with any number of
    DataLoader workers.

    Args:
        cases: Cases with labels, each with image and label of shape (X, Y, Z).
        context: Neighbour slices on each side. A sample has
            ``2 * context + 1`` channels, and slices past the volume edge
            repeat the edge slice.
        patch_size: Side in voxels of a square crop. The crop position is
            random with ``augment=True`` and central otherwise. None returns
            the whole slice.
        augment: Apply a random crop position, left-right flip with parotid
            label swap, intensity scale and shift, and Gaussian noise.
        seed: Seed of the augmentation draws.
        background_fraction: Share of ``slice_weights`` given to slices
            without any organ, in [0, 1).
        window_lower: Lower bound of the HU window.
        window_upper: Upper bound of the HU window.

    Attributes:
        slice_weights: (N,) float64 sampling weight per sample, summing to 1,
            for ``torch.utils.data.WeightedRandomSampler``.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        context: int = 1,
        patch_size: int | None = None,
        augment: bool = False,
        seed: int = 42,
        background_fraction: float = 0.2,
        window_lower: float = WINDOW_LOWER_HU,
        window_upper: float = WINDOW_UPPER_HU,
    ) -> None:
        _check_arguments(cases, context, patch_size, background_fraction)
        self.context = context
        self.patch_size = patch_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

        self.case_ids = [case.case_id for case in cases]
        self.images = [window_hu(case.image, window_lower, window_upper) for case in cases]  # (X, Y, Z) each
        self.labels = [case.label for case in cases]  # (X, Y, Z) uint8 each

        # One row per sample: (position in cases, z).
        self.slice_positions = np.array(
            [(position, z) for position, case in enumerate(cases) for z in range(case.image.shape[2])], dtype=np.int64
        )
        self.slice_weights = compute_slice_weights(self.labels, background_fraction)

    def __len__(self) -> int:
        return len(self.slice_positions)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed`` and the index, fixes the augmentation draws.

        Call it before each epoch's DataLoader iterator is created.
        """
        # NOTE: DataLoader workers with persistent_workers=True keep their own
        # copy of the dataset, so they do not see a later set_epoch call.
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        """Return ``image`` (C, H, W) float32, ``label`` (H, W) int64, ``case_id`` and ``slice_index``.

        H and W are X and Y of the case, or ``patch_size``.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"Sample index {index} is out of range for {len(self)} slices.")
        index = int(index) % len(self)
        position, z = (int(value) for value in self.slice_positions[index])
        volume = self.images[position]  # (X, Y, Z)
        image = volume[:, :, neighbour_indices(volume.shape[2], self.context)[z]].transpose(2, 0, 1)  # (C, X, Y)
        label = self.labels[position][:, :, z]  # (X, Y)

        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, label = self._crop(image, label, rng)
        if self.augment:
            image, label = _augment(image, label, rng)

        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case_id": self.case_ids[position],
            "slice_index": z,
        }

    def _crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.patch_size is None:
            return image, label

        size = self.patch_size
        height, width = label.shape
        if self.augment:
            top, left = _crop_corner(label, size, rng)
        else:
            top, left = (height - size) // 2, (width - size) // 2
        return image[:, top : top + size, left : left + size], label[top : top + size, left : left + size]


def _crop_corner(label: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Draw the top-left corner of a training crop, centred near an organ voxel when possible.

    Organs cover well under 1% of a slice, so uniform crops teach mostly
    background. Like nnU-Net's foreground oversampling, a share
    ``FOREGROUND_CROP_PROBABILITY`` of crops is centred on a random organ
    voxel (plus a jitter of up to a quarter of the crop), the rest are uniform.
    """
    height, width = label.shape
    centre_on_organ = rng.random() < FOREGROUND_CROP_PROBABILITY
    uniform_top = int(rng.integers(0, height - size + 1))
    uniform_left = int(rng.integers(0, width - size + 1))
    rows, cols = np.nonzero(label)
    if not centre_on_organ or rows.size == 0:
        return uniform_top, uniform_left

    pick = int(rng.integers(0, rows.size))
    jitter = rng.integers(-(size // 4), size // 4 + 1, size=2)
    top = int(np.clip(rows[pick] - size // 2 + jitter[0], 0, height - size))
    left = int(np.clip(cols[pick] - size // 2 + jitter[1], 0, width - size))
    return top, left


def _check_arguments(cases: Sequence[Case], context: int, patch_size: int | None, background_fraction: float) -> None:
    if not cases:
        raise ValueError("SliceDataset needs at least one case, but got none.")
    if not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an integer >= 0, got {context!r}.")
    if not 0.0 <= background_fraction < 1.0:
        raise ValueError(f"background_fraction must be in [0, 1), got {background_fraction!r}.")

    for case in cases:
        if case.label is None:
            raise ValueError(f"Case {case.case_id} has no label. SliceDataset trains on labelled cases only.")
        if case.image.ndim != 3 or case.label.shape != case.image.shape:
            raise ValueError(
                f"Case {case.case_id}: image shape {case.image.shape} and label shape {case.label.shape} "
                "must be the same 3D (X, Y, Z) shape."
            )
        if patch_size is not None and not 0 < patch_size <= min(case.image.shape[:2]):
            raise ValueError(
                f"patch_size {patch_size} does not fit the {case.image.shape[:2]} slices of case {case.case_id}. "
                "Pass a positive size up to the slice size, or None for whole slices."
            )


def _augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip left-right with parotid swap, then scale, shift and add noise to (C, H, W) intensities.

    All draws happen in a fixed order whether or not they are used, so each
    sample's draws depend only on the generator's seed.
    """
    flip = rng.random() < FLIP_PROBABILITY
    scale = 1.0 + rng.uniform(-INTENSITY_SCALE_RANGE, INTENSITY_SCALE_RANGE)
    shift = rng.uniform(-INTENSITY_SHIFT_RANGE, INTENSITY_SHIFT_RANGE)
    noise = rng.normal(0.0, NOISE_STD, size=image.shape)

    # Axis -1 (columns) runs from patient right to left.
    if flip:
        image = image[:, :, ::-1]
        label = _FLIP_LOOKUP[label[:, ::-1]]

    image = (image * scale + shift + noise).astype(np.float32)
    return image, label


def neighbour_indices(depth: int, context: int) -> np.ndarray:
    """Return a (depth, 2 * context + 1) array of slice indices, edge slices repeated."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)


def compute_slice_weights(labels: Sequence[np.ndarray], background_fraction: float = 0.2) -> np.ndarray:
    """Compute sampling weights for the axial slices of ``labels``, in order, favouring small organs.

    A slice with organs gets the sum, over the organs on it, of 1 / (the
    organ's voxel count over all ``labels``), so slices with rare, small
    organs are drawn more often. The foreground slices then share
    ``1 - background_fraction`` of the total weight in those proportions, and
    the slices without organs share ``background_fraction`` equally.

    Args:
        labels: Label maps of shape (X, Y, Z), 0 for background.
        background_fraction: Share of the total weight on slices without organs.

    Returns:
        (N,) float64 weights summing to 1, where N is the total slice count.
        If no slice contains an organ, all slices weigh the same. If every
        slice contains one, ``background_fraction`` has no effect.
    """
    organ_values = sorted(set().union(*(np.unique(label).tolist() for label in labels)) - {0})
    voxel_counts = sum(np.bincount(label.ravel(), minlength=256).astype(np.float64) for label in labels)

    organ_weights = 1.0 / voxel_counts[organ_values]
    raw = []
    for label in labels:
        present = np.zeros((label.shape[2], len(organ_values)), dtype=bool)  # (Z, organs)
        for column, value in enumerate(organ_values):
            present[:, column] = np.any(label == value, axis=(0, 1))
        raw.append(present @ organ_weights)
    raw = np.concatenate(raw)

    foreground = raw > 0
    if not foreground.any():
        logger.info("None of the %d slices contains an organ, so all slices weigh the same", raw.size)
        return np.full(raw.size, 1.0 / raw.size)
    if foreground.all():
        logger.info("Every slice contains an organ, so background_fraction=%s has no effect", background_fraction)
        return raw / raw.sum()

    weights = np.where(foreground, raw / raw[foreground].sum() * (1.0 - background_fraction), 0.0)
    weights[~foreground] = background_fraction / np.count_nonzero(~foreground)
    return weights


def volume_slices(
    case: Case,
    context: int = 1,
    window_lower: float = WINDOW_LOWER_HU,
    window_upper: float = WINDOW_UPPER_HU,
) -> torch.Tensor:
    """Stack every axial slice of ``case`` with its neighbours, for whole-volume inference.

    Applies no crop and no augmentation. Sample z equals
    ``SliceDataset([case], context)[z]["image"]``.

    Returns:
        (Z, 2 * context + 1, X, Y) float32 windowed intensities.
    """
    if not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an integer >= 0, got {context!r}.")
    if case.image.ndim != 3:
        raise ValueError(f"Case {case.case_id} has image shape {case.image.shape}, expected a 3D (X, Y, Z) volume.")

    windowed = window_hu(case.image, window_lower, window_upper)  # (X, Y, Z)
    stacked = windowed[:, :, neighbour_indices(windowed.shape[2], context)]  # (X, Y, Z, C)
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(2, 3, 0, 1)))
