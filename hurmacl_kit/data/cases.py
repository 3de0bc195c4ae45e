"""Load and validate converted cases in the nnU-Net raw layout.

A converted dataset folder contains ``dataset.json``,
``imagesTr/{case_id}_0000.nii.gz`` and ``labelsTr/{case_id}.nii.gz``, as
written by ``hurmacl_kit.data.openkbp.convert_dataset``.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from hurmacl_kit.data.openkbp import LABELS

# Default CT window in HU. It spans the soft tissue of most organs at risk
# (about -100 to 100 HU) and saturates only in dense bone, so the mandible
# stays distinct from soft tissue.
WINDOW_LOWER_HU = -250.0
WINDOW_UPPER_HU = 750.0

_RECONVERT = "Re-run the conversion (data_scripts/convert_openkbp.py)."


class DataValidationError(ValueError):
    """A converted file or dataset folder that is missing, corrupt or inconsistent."""


@dataclass
class Case:
    """One CT volume with its optional label map, in the array order of the file."""

    case_id: str
    image: np.ndarray  # (X, Y, Z) float32 HU
    label: np.ndarray | None  # (X, Y, Z) uint8, values from the dataset's label map
    spacing: tuple[float, float, float]  # mm along X, Y, Z
    affine: np.ndarray  # (4, 4) voxel to RAS+ mm


@dataclass
class DatasetInfo:
    """The content of a converted dataset's ``dataset.json``."""

    root: Path
    labels: dict[str, int]
    case_ids: list[str]
    splits: dict[str, list[str]]


def load_dataset_info(root: str | os.PathLike) -> DatasetInfo:
    """Read and check ``root/dataset.json`` and the files of the cases it lists.

    The case ids are those listed in ``splits``, in order. A ``dataset.json``
    without ``splits`` (plain nnU-Net) gets every case of ``imagesTr`` in a
    single ``train`` split.

    Args:
        root: Dataset folder, such as ``sample_data/openkbp``.

    Returns:
        The label map, case ids and splits.

    Raises:
        DataValidationError: If ``dataset.json`` is missing or not valid
            JSON, has an invalid ``labels``, ``file_ending``,
            ``channel_names`` or ``splits``, a listed case has no image or
            label file, or ``numTraining`` differs from the image count.
    """
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise DataValidationError(f"{path} not found, so {root} is not a converted dataset. {_RECONVERT}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataValidationError(f"{path} is not valid JSON ({error}). {_RECONVERT}") from error
    if not isinstance(content, dict):
        raise DataValidationError(f"{path} must contain a JSON object, found {type(content).__name__}. {_RECONVERT}")

    labels = _check_labels(path, content)
    _check_format(path, content)
    splits = content.get("splits") or {"train": _image_case_ids(root)}
    _check_splits(path, splits)

    case_ids = [case_id for ids in splits.values() for case_id in ids]
    info = DatasetInfo(root=root, labels=labels, case_ids=case_ids, splits={name: list(ids) for name, ids in splits.items()})
    _check_case_files(info)
    _check_training_count(path, content, _image_case_ids(root))
    return info


def _check_labels(path: Path, content: dict) -> dict[str, int]:
    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataValidationError(f"{path}: 'labels' must map label names to integers, found {labels!r}. {_RECONVERT}")

    invalid = {name: value for name, value in labels.items() if not isinstance(value, int) or not 0 <= value <= 255}
    if invalid:
        raise DataValidationError(f"{path}: label values {invalid} are not integers in 0..255. {_RECONVERT}")
    if labels.get("background") != 0:
        raise DataValidationError(f"{path}: 'labels' must contain 'background': 0, found {labels!r}. {_RECONVERT}")
    return dict(labels)


def _check_format(path: Path, content: dict) -> None:
    if content.get("file_ending") != ".nii.gz":
        raise DataValidationError(f"{path}: 'file_ending' is {content.get('file_ending')!r}, expected '.nii.gz'. {_RECONVERT}")
    channels = content.get("channel_names")
    if not isinstance(channels, dict) or len(channels) != 1:
        raise DataValidationError(f"{path}: expected one image channel in 'channel_names', found {channels!r}. {_RECONVERT}")


def _check_splits(path: Path, splits: object) -> None:
    valid = isinstance(splits, dict) and all(
        isinstance(ids, list) and all(isinstance(case_id, str) for case_id in ids) for ids in splits.values()
    )
    if not valid:
        raise DataValidationError(f"{path}: 'splits' must map split names to lists of case ids, found {splits!r}. {_RECONVERT}")

    listed = [case_id for ids in splits.values() for case_id in ids]
    repeated = sorted({case_id for case_id in listed if listed.count(case_id) > 1})
    if repeated:
        raise DataValidationError(f"{path}: case ids {repeated} appear more than once in 'splits'. {_RECONVERT}")


def _check_training_count(path: Path, content: dict, image_case_ids: list[str]) -> None:
    count = content.get("numTraining")
    if count != len(image_case_ids):
        raise DataValidationError(
            f"{path}: 'numTraining' is {count!r}, but {path.parent / 'imagesTr'} contains "
            f"{len(image_case_ids)} image(s). {_RECONVERT}"
        )


def _image_case_ids(root: Path) -> list[str]:
    return sorted(path.name.removesuffix("_0000.nii.gz") for path in (root / "imagesTr").glob("*_0000.nii.gz"))


def _check_case_files(info: DatasetInfo) -> None:
    missing = [str(path) for case_id in info.case_ids for path in case_paths(info, case_id) if not path.is_file()]
    if missing:
        listed_paths = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataValidationError(
            f"dataset.json in {info.root} lists cases whose files are missing: {listed_paths}. {_RECONVERT}"
        )


def case_paths(info: DatasetInfo, case_id: str) -> tuple[Path, Path]:
    """Return the image and label paths of ``case_id`` in the nnU-Net raw layout."""
    return info.root / "imagesTr" / f"{case_id}_0000.nii.gz", info.root / "labelsTr" / f"{case_id}.nii.gz"


def load_dataset_case(info: DatasetInfo, case_id: str) -> Case:
    """Load and validate one case of a dataset read by ``load_dataset_info``.

    Raises:
        DataValidationError: If ``case_id`` is not in the dataset, or as
            ``load_case``.
    """
    if case_id not in info.case_ids:
        raise DataValidationError(
            f"Case {case_id!r} is not listed in {info.root / 'dataset.json'}. Known cases: {info.case_ids}."
        )
    image_path, label_path = case_paths(info, case_id)
    return load_case(image_path, label_path, labels=info.labels)


def load_case(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    labels: Mapping[str, int] = LABELS,
    atol: float = 1e-3,
) -> Case:
    """Load a CT image and an optional label map, and check that they fit together.

    The case id is the image file name without ``_0000.nii.gz``.

    Args:
        image_path: 3D NIfTI CT in HU.
        label_path: 3D NIfTI label map on the same grid, or None.
        labels: Label map. Every value in the label file must be one of its values.
        atol: Absolute tolerance in mm for comparing spacing and affine.

    Returns:
        The case, with the image as float32 HU and the label as uint8.

    Raises:
        DataValidationError: If a file is missing, truncated or corrupt, the
            image is not 3D or has NaN or infinite voxels, the label has
            values outside ``labels``, or the label's shape, spacing or
            affine differs from the image's.
    """
    image_path = Path(image_path)
    image_file = _load_nifti(image_path)
    image = _read_array(image_file, image_path, dtype=np.float32)
    _check_image(image, image_path)

    spacing = tuple(float(size) for size in image_file.header.get_zooms()[:3])
    case_id = image_path.name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_0000")
    case = Case(case_id=case_id, image=image, label=None, spacing=spacing, affine=image_file.affine)
    if label_path is None:
        return case

    label_path = Path(label_path)
    label_file = _load_nifti(label_path)
    label = _read_array(label_file, label_path, dtype=None)
    _check_geometry(case, image_path, label, label_file, label_path, atol)
    case.label = _check_label_values(label, label_path, labels)
    return case


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataValidationError(f"{path} not found. {_RECONVERT}")
    try:
        return nib.load(path)
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as error:
        raise DataValidationError(f"{path} is not a readable NIfTI file ({error}). {_RECONVERT}") from error


def _read_array(image_file: nib.Nifti1Image, path: Path, dtype: type | None) -> np.ndarray:
    # nibabel reads the voxels lazily, so a truncated gzip stream fails here.
    try:
        if dtype is None:
            return np.asarray(image_file.dataobj)
        return image_file.get_fdata(dtype=dtype)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise DataValidationError(f"{path} is truncated or corrupt ({error}). {_RECONVERT}") from error


def _check_image(image: np.ndarray, path: Path) -> None:
    if image.ndim != 3:
        raise DataValidationError(f"{path} has shape {image.shape}, expected a 3D (X, Y, Z) volume. {_RECONVERT}")

    non_finite = int(np.count_nonzero(~np.isfinite(image)))
    if non_finite:
        raise DataValidationError(f"{path} has {non_finite} NaN or infinite voxel(s). {_RECONVERT}")


def _check_geometry(
    case: Case, image_path: Path, label: np.ndarray, label_file: nib.Nifti1Image, label_path: Path, atol: float
) -> None:
    if label.shape != case.image.shape:
        raise DataValidationError(
            f"{label_path} has shape {label.shape}, but {image_path} has {case.image.shape}. {_RECONVERT}"
        )

    label_spacing = tuple(float(size) for size in label_file.header.get_zooms()[:3])
    if not np.allclose(label_spacing, case.spacing, rtol=0, atol=atol):
        raise DataValidationError(
            f"{label_path} has spacing {label_spacing} mm, but {image_path} has {case.spacing} mm. {_RECONVERT}"
        )

    if not np.allclose(label_file.affine, case.affine, rtol=0, atol=atol):
        raise DataValidationError(
            f"{label_path} has affine\n{label_file.affine}\nbut {image_path} has\n{case.affine}\n{_RECONVERT}"
        )


def _check_label_values(label: np.ndarray, path: Path, labels: Mapping[str, int]) -> np.ndarray:
    values = np.unique(label)
    unknown = [value.item() for value in values if value not in set(labels.values())]
    if unknown:
        raise DataValidationError(
            f"{path} has label value(s) {unknown} outside the label map {dict(labels)}. {_RECONVERT}"
        )
    return label.astype(np.uint8)


def window_hu(hu: np.ndarray, lower: float = WINDOW_LOWER_HU, upper: float = WINDOW_UPPER_HU) -> np.ndarray:
    """Clip HU to [lower, upper] and scale linearly to float32 in [0, 1].

    Raises:
        ValueError: If ``lower`` is not below ``upper`` or either is not finite.
    """
    if not (np.isfinite(lower) and np.isfinite(upper) and lower < upper):
        raise ValueError(f"HU window [{lower}, {upper}] is invalid. Pass finite bounds with lower < upper.")
    clipped = np.clip(np.asarray(hu, dtype=np.float32), lower, upper)
    return (clipped - np.float32(lower)) / np.float32(upper - lower)
