"""Read OpenKBP patient folders and convert them to the nnU-Net raw layout.

OpenKBP (A. Babier et al., "OpenKBP: The open-access knowledge-based planning
grand challenge and dataset", Medical Physics 48(9):5549-5561, 2021) stores
each patient as sparse CSV files on a 128 x 128 x 128 grid:

- ``ct.csv``: header ``,data``, then rows ``flat_index,value`` with value =
  HU + 1024. Absent voxels are 0, which is air (-1024 HU).
- ``<Organ>.csv``: the same header, then rows ``flat_index,`` whose empty
  value means 1. The clinic did not contour an organ whose file is missing.
- ``voxel_dimensions.csv``: three lines, the voxel size in mm along array
  axes 0, 1 and 2.

``flat_index`` indexes the (row, column, slice) array in C order. An axial
slice is ``array[:, :, k]``, with k = 0 the most superior slice and row 0
anterior.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path
from typing import Iterable, NoReturn, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from hurmacl_kit.io import atomic_save, atomic_write_json

logger = logging.getLogger(__name__)

OPENKBP_SHAPE = (128, 128, 128)
OAR_NAMES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
LABELS: dict[str, int] = {"background": 0, **{name: value for value, name in enumerate(OAR_NAMES, start=1)}}

# OpenKBP stores CT as HU + 1024. Some patients contain 16-bit values, so the
# OpenKBP data description recommends clipping to the 12-bit range [0, 4095].
CT_OFFSET = 1024
CT_STORED_MAX = 4095

# Split folders of the OpenKBP ``provided-data`` folder, in conversion order.
SPLIT_FOLDERS = {"train-pats": "train", "validation-pats": "validation", "test-pats": "test"}

DATASET_NAME = "OpenKBP-OAR"
DATASET_DESCRIPTION = (
    "Head-and-neck planning CT (HU, 128 x 128 x 128) from OpenKBP with seven organ-at-risk labels. "
    "Where two organ masks overlap, the organ with fewer voxels in that patient keeps the voxel."
)
DATASET_LICENCE = (
    "MIT, as the OpenKBP repository ababier/open-kbp. "
    "The CT images originate from The Cancer Imaging Archive (TCIA) head-and-neck collections."
)
DATASET_REFERENCE = (
    'A. Babier et al., "OpenKBP: The open-access knowledge-based planning grand challenge and dataset", '
    "Medical Physics 48(9):5549-5561, 2021."
)
DATASET_SOURCE = "https://github.com/ababier/open-kbp, folder provided-data/"

_RECOPY = "Copy the patient folder again from the OpenKBP provided-data folder."


def read_patient(patient_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read one OpenKBP patient folder into a CT volume and an organ label map.

    Where two organ masks overlap, the organ with fewer voxels in this patient
    keeps the voxel, because small organs are the harder ones to segment and
    lose a larger share of their volume to each overlapping voxel. Ties go to
    the organ that comes first in ``OAR_NAMES``. Target masks (``PTV*.csv``)
    are ignored.

    Args:
        patient_dir: Folder with ``ct.csv``, ``voxel_dimensions.csv`` and one
            CSV per organ, such as ``provided-data/train-pats/pt_4``.

    Returns:
        ``(hu, label, spacing)``: ``hu`` is int16 HU of shape (128, 128, 128),
        in [-1024, 3071]. ``label`` is uint8 with values from ``LABELS``.
        ``spacing`` is the voxel size in mm along axes 0, 1 and 2.

    Raises:
        ValueError: If the folder, ``ct.csv`` or ``voxel_dimensions.csv`` is
            missing, or a file has an invalid header, row or flat index.
    """
    patient_dir = Path(patient_dir)
    if not patient_dir.is_dir():
        raise ValueError(f"OpenKBP patient folder {patient_dir} not found. Pass a folder that contains ct.csv.")

    hu = read_ct(patient_dir / "ct.csv")
    spacing = read_spacing(patient_dir / "voxel_dimensions.csv")

    masks = {}
    for name in OAR_NAMES:
        path = patient_dir / f"{name}.csv"
        if not path.is_file():
            # NOTE: the organ's voxels then count as background, although they
            # are only unlabelled. The 43 patients of the shipped sample have
            # all seven files, but many others in the full OpenKBP set do not.
            logger.warning("%s: %s not found, so %s is absent from the label map", patient_dir.name, path.name, name)
            continue
        masks[name] = read_mask(path)

    label = merge_masks(masks, case_id=patient_dir.name)
    return hu, label, spacing


def read_ct(path: Path) -> np.ndarray:
    """Read ``ct.csv`` into int16 HU of shape (128, 128, 128)."""
    if not path.is_file():
        raise ValueError(f"{path} not found, but every OpenKBP patient needs a CT. {_RECOPY}")
    indexes, values = _read_sparse_csv(path, expect_values=True)

    stored = np.zeros(np.prod(OPENKBP_SHAPE), dtype=np.float64)
    stored[indexes] = values
    hu = np.rint(np.clip(stored, 0, CT_STORED_MAX)) - CT_OFFSET
    return hu.astype(np.int16).reshape(OPENKBP_SHAPE)


def read_mask(path: Path) -> np.ndarray:
    """Read an organ CSV into the sorted flat indexes of its voxels."""
    indexes, values = _read_sparse_csv(path, expect_values=False)

    not_one = np.flatnonzero(~np.isnan(values) & (values != 1))
    if not_one.size:
        raise ValueError(
            f"{path}: a mask value must be empty or 1, but flat index {indexes[not_one[0]]} has "
            f"{values[not_one[0]]}. {_RECOPY}"
        )
    return np.sort(indexes)


def read_spacing(path: Path) -> tuple[float, float, float]:
    """Read ``voxel_dimensions.csv``: three lines in mm, for array axes 0, 1 and 2.

    The OpenKBP data description lists the voxel size as x by y by z with
    about 2 mm for z, and the third line (2.5 or 3.0 mm in the released data)
    is the slice spacing. Lines 1 and 2 are equal in every released patient,
    so the data cannot show which of them belongs to rows.
    """
    if not path.is_file():
        raise ValueError(f"{path} not found, but every OpenKBP patient needs the voxel size. {_RECOPY}")

    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        spacing = tuple(float(line) for line in lines)
    except ValueError as error:
        raise ValueError(f"{path}: expected three numbers in mm, one per line, found {lines!r}. {_RECOPY}") from error
    if len(spacing) != 3 or not all(np.isfinite(size) and size > 0 for size in spacing):
        raise ValueError(f"{path}: expected three positive voxel sizes in mm, found {lines!r}. {_RECOPY}")
    return spacing


def merge_masks(masks: dict[str, np.ndarray], case_id: str = "") -> np.ndarray:
    """Paint organ masks (flat indexes) into one uint8 label map, smaller organs last.

    Painting in order of decreasing voxel count lets the smaller organ keep
    each overlapping voxel, as ``read_patient`` documents.
    """
    flat = np.zeros(np.prod(OPENKBP_SHAPE), dtype=np.uint8)
    painted = np.zeros(flat.shape, dtype=bool)
    by_size = sorted(masks, key=lambda name: (-masks[name].size, -LABELS[name]))

    for name in by_size:
        indexes = masks[name]
        overlap = int(painted[indexes].sum())
        if overlap:
            logger.debug("%s: %d voxel(s) of %s overlap a larger organ and are labelled %s", case_id, overlap, name, name)
        flat[indexes] = LABELS[name]
        painted[indexes] = True

    return flat.reshape(OPENKBP_SHAPE)


def _read_sparse_csv(path: Path, expect_values: bool) -> tuple[np.ndarray, np.ndarray]:
    """Parse an OpenKBP sparse CSV into int64 flat indexes and float64 values.

    An empty value becomes NaN. ``expect_values`` rejects empty values, as
    ``ct.csv`` needs.
    """
    lines = path.read_text().splitlines()
    header = lines[0].strip() if lines else ""
    if header != ",data":
        raise ValueError(f"{path}: expected the header ',data' on line 1, found {header!r}. {_RECOPY}")

    numbered_rows = [(number, line) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    try:
        indexes, values = _parse_rows([line for _, line in numbered_rows], expect_values)
    except ValueError:
        _raise_for_first_invalid_row(path, numbered_rows, expect_values)

    _check_indexes(path, indexes)
    return indexes, values


def _parse_rows(lines: list[str], expect_values: bool) -> tuple[np.ndarray, np.ndarray]:
    """Parse all rows at once. Raises ValueError, without the line, on any invalid row."""
    fields = [line.split(",") for line in lines]
    if any(len(pair) != 2 for pair in fields):
        raise ValueError("a row does not have two fields")

    index_text = np.array([pair[0].strip() for pair in fields], dtype=str)
    if not np.char.isdigit(index_text).all():
        raise ValueError("a flat index is not a non-negative integer")

    value_text = np.array([pair[1].strip() for pair in fields], dtype=str)
    empty = value_text == ""
    if expect_values and empty.any():
        raise ValueError("a value is empty")
    values = np.where(empty, "nan", value_text).astype(np.float64)
    if not np.isfinite(values[~empty]).all():
        raise ValueError("a value is not finite")

    return index_text.astype(np.int64), values


def _raise_for_first_invalid_row(path: Path, numbered_rows: list[tuple[int, str]], expect_values: bool) -> NoReturn:
    """Raise ValueError naming the first row that ``_parse_rows`` rejects."""
    expected = "flat_index,value" if expect_values else "flat_index, or flat_index,1"
    for number, line in numbered_rows:
        fields = line.split(",")
        if len(fields) != 2 or re.fullmatch(r"\s*\d+\s*", fields[0]) is None:
            raise ValueError(f"{path}, line {number}: expected '{expected}', found {line!r}. {_RECOPY}")

        value = fields[1].strip()
        if not value:
            if expect_values:
                raise ValueError(f"{path}, line {number}: expected '{expected}', found {line!r}. {_RECOPY}")
            continue
        try:
            finite = np.isfinite(float(value))
        except ValueError:
            finite = False
        if not finite:
            raise ValueError(f"{path}, line {number}: value {value!r} is not a finite number. {_RECOPY}")

    raise ValueError(f"{path}: invalid rows. {_RECOPY}")


def _check_indexes(path: Path, indexes: np.ndarray) -> None:
    voxel_count = int(np.prod(OPENKBP_SHAPE))
    out_of_range = np.flatnonzero(indexes >= voxel_count)
    if out_of_range.size:
        raise ValueError(
            f"{path}: flat index {indexes[out_of_range[0]]} is out of range for a "
            f"{OPENKBP_SHAPE} volume (valid: 0 to {voxel_count - 1}). {_RECOPY}"
        )

    unique, counts = np.unique(indexes, return_counts=True)
    if unique.size != indexes.size:
        raise ValueError(f"{path}: flat index {unique[counts > 1][0]} appears more than once. {_RECOPY}")


def openkbp_affine(spacing: Sequence[float]) -> np.ndarray:
    """Build the (4, 4) voxel-to-RAS+ affine in mm for an OpenKBP array.

    Axis 0 (rows, anterior to posterior) maps to -y, axis 1 (columns) to -x
    and axis 2 (slices, superior to inferior) to -z, so ``nib.aff2axcodes``
    returns ('P', 'L', 'I'). OpenKBP stores no patient position, so voxel
    (0, 0, 0) sits at the world origin.
    """
    # NOTE: OpenKBP does not document the column direction. Columns are taken
    # to run from patient right to left, as in radiological display, which
    # matches the released masks: the RightParotid centroid has a smaller
    # column index than the LeftParotid centroid in all 43 patients checked.
    affine = np.zeros((4, 4))
    affine[1, 0] = -spacing[0]
    affine[0, 1] = -spacing[1]
    affine[2, 2] = -spacing[2]
    affine[3, 3] = 1.0
    return affine


def make_nifti(array: np.ndarray, spacing: Sequence[float]) -> nib.Nifti1Image:
    """Wrap an OpenKBP-ordered (X, Y, Z) array in a NIfTI-1 image with the RAS+ affine.

    The qform and sform both carry the affine with code 1 (scanner), and the
    header stores the array dtype unscaled and the zooms in mm.
    """
    affine = openkbp_affine(spacing)
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units(xyz="mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_zooms(tuple(float(size) for size in spacing))
    return image


def save_nifti(image: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Write ``image`` to a ``.nii.gz`` file atomically, with gzip level 9.

    nibabel 5 writes gzip level 1 by default. Level 9 makes the shipped
    sample about 6% smaller, and a zero gzip timestamp keeps the bytes
    identical across runs.
    """
    payload = gzip.compress(image.to_bytes(), compresslevel=9, mtime=0)
    atomic_save(path, lambda temporary: temporary.write_bytes(payload), suffix=".nii.gz")


def discover_patients(
    source: str | os.PathLike, patients: Iterable[str] | None = None
) -> tuple[list[Path], dict[str, list[str]]]:
    """Find OpenKBP patient folders and their splits under ``source``.

    ``source`` may be the OpenKBP ``provided-data`` folder, whose
    ``train-pats``, ``validation-pats`` and ``test-pats`` become the splits
    ``train``, ``validation`` and ``test``. It may also be a folder of patient
    folders or a single patient folder (one with ``ct.csv``), and then every
    patient goes to ``train``.

    Args:
        source: Folder to search.
        patients: Patient folder names to keep, such as ``["pt_4", "pt_13"]``.
            None keeps all.

    Returns:
        ``(patient_dirs, splits)``, both in natural order (pt_4 before pt_13).
        Empty splits are left out.

    Raises:
        ValueError: If ``source`` is not a folder, contains no patient folders,
            or lacks one of ``patients``.
    """
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"OpenKBP folder {source} not found. Pass provided-data or a folder of patient folders.")

    if (source / "ct.csv").is_file():
        folders = {"train": [source]}
    elif any((source / name).is_dir() for name in SPLIT_FOLDERS):
        folders = {split: _patient_folders(source / name) for name, split in SPLIT_FOLDERS.items()}
    else:
        folders = {"train": _patient_folders(source)}

    if patients is not None:
        folders = _keep_patients(source, folders, list(patients))

    folders = {split: dirs for split, dirs in folders.items() if dirs}
    if not folders:
        raise ValueError(f"No patient folders found in {source}. Each patient folder must contain ct.csv.")

    patient_dirs = [path for dirs in folders.values() for path in dirs]
    splits = {split: [path.name for path in dirs] for split, dirs in folders.items()}
    return patient_dirs, splits


def _patient_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")]
    return sorted(found, key=_natural_key)


def _natural_key(item: Path | str) -> tuple:
    name = item.name if isinstance(item, Path) else item
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _keep_patients(source: Path, folders: dict[str, list[Path]], patients: list[str]) -> dict[str, list[Path]]:
    known = {path.name for dirs in folders.values() for path in dirs}
    missing = [name for name in patients if name not in known]
    if missing:
        raise ValueError(f"Patient folder(s) {missing} not found in {source}. Available: {sorted(known, key=_natural_key)}.")
    return {split: [path for path in dirs if path.name in patients] for split, dirs in folders.items()}


def convert_dataset(
    patient_dirs: Sequence[str | os.PathLike],
    out_root: str | os.PathLike,
    splits: dict[str, list[str]] | None = None,
    *,
    source: str = DATASET_SOURCE,
) -> Path:
    """Convert OpenKBP patient folders to the nnU-Net raw layout under ``out_root``.

    Writes ``imagesTr/{case_id}_0000.nii.gz`` (int16 HU),
    ``labelsTr/{case_id}.nii.gz`` (uint8, values from ``LABELS``) and, last,
    ``dataset.json``. The case id is the patient folder name. Every file is
    written atomically, so a re-run over the same cases replaces them safely.

    Args:
        patient_dirs: OpenKBP patient folders, such as from ``discover_patients``.
        out_root: Destination folder, created if missing.
        splits: Split name to case ids. Each case must be in exactly one
            split. None puts every case in ``train``.
        source: Text for the ``source`` field of ``dataset.json``.

    Returns:
        ``out_root`` as a Path.

    Raises:
        ValueError: On duplicate case ids, invalid splits, files in
            ``out_root`` for cases outside this conversion, or any error of
            ``read_patient``.
    """
    patient_dirs = [Path(path) for path in patient_dirs]
    case_ids = [path.name for path in patient_dirs]
    out_root = Path(out_root)

    _check_case_ids(case_ids)
    splits = {"train": list(case_ids)} if splits is None else splits
    _check_splits(splits, case_ids)
    _check_no_other_cases(out_root, case_ids)

    logger.info("Converting %d OpenKBP patient(s) to %s", len(case_ids), out_root)
    for patient_dir in tqdm(patient_dirs, desc="Converting OpenKBP", unit="patient"):
        hu, label, spacing = read_patient(patient_dir)
        save_nifti(make_nifti(hu, spacing), out_root / "imagesTr" / f"{patient_dir.name}_0000.nii.gz")
        save_nifti(make_nifti(label, spacing), out_root / "labelsTr" / f"{patient_dir.name}.nii.gz")

    atomic_write_json(out_root / "dataset.json", build_dataset_json(case_ids, splits, source))
    logger.info("Wrote %s", out_root / "dataset.json")
    return out_root


def build_dataset_json(case_ids: Sequence[str], splits: dict[str, list[str]], source: str = DATASET_SOURCE) -> dict:
    """Build the ``dataset.json`` content.

    ``licence``, ``reference``, ``source`` and ``splits`` are hurmacl-kit
    additions to the nnU-Net v2 keys.
    """
    return {
        "name": DATASET_NAME,
        "description": DATASET_DESCRIPTION,
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": len(case_ids),
        "file_ending": ".nii.gz",
        "licence": DATASET_LICENCE,
        "reference": DATASET_REFERENCE,
        "source": source,
        "splits": {split: list(ids) for split, ids in splits.items()},
    }


def _check_case_ids(case_ids: list[str]) -> None:
    if not case_ids:
        raise ValueError("No patient folders to convert. Pass at least one OpenKBP patient folder.")
    duplicates = sorted({case_id for case_id in case_ids if case_ids.count(case_id) > 1})
    if duplicates:
        raise ValueError(f"Case ids {duplicates} occur more than once, but each patient folder name must be unique.")


def _check_splits(splits: dict[str, list[str]], case_ids: list[str]) -> None:
    listed = [case_id for ids in splits.values() for case_id in ids]
    unknown = sorted(set(listed) - set(case_ids))
    twice = sorted({case_id for case_id in listed if listed.count(case_id) > 1})
    unlisted = [case_id for case_id in case_ids if case_id not in listed]
    if unknown:
        raise ValueError(f"Splits list case ids {unknown} that are not among the patient folders {case_ids}.")
    if twice:
        raise ValueError(f"Case ids {twice} appear in more than one split. Put each case in exactly one split.")
    if unlisted:
        raise ValueError(f"Case ids {unlisted} are in no split. Put each case in exactly one split.")


def _check_no_other_cases(out_root: Path, case_ids: list[str]) -> None:
    existing = {path.name.removesuffix("_0000.nii.gz") for path in (out_root / "imagesTr").glob("*_0000.nii.gz")}
    others = sorted(existing - set(case_ids))
    if others:
        raise ValueError(
            f"{out_root / 'imagesTr'} already contains cases {others} that are not in this conversion. "
            "Choose an empty output folder or delete those cases first."
        )
