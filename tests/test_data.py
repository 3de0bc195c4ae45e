"""Tests of the data layer: OpenKBP conversion, case loading and validation, slice datasets.

Most tests use the shipped sample ``sample_data/openkbp``. Tests marked
``shared_data`` also read the original OpenKBP CSV files and are skipped when
that copy is absent.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hurmacl_kit.data import (
    LABELS,
    OAR_NAMES,
    Case,
    DataValidationError,
    SliceDataset,
    compute_slice_weights,
    convert_dataset,
    discover_patients,
    load_case,
    load_dataset_case,
    load_dataset_info,
    make_nifti,
    read_patient,
    save_nifti,
    volume_slices,
    window_hu,
)

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = REPOSITORY_ROOT / "sample_data" / "openkbp"
OPENKBP_COPY = REPOSITORY_ROOT.parent / "shared" / "data" / "openkbp"

needs_openkbp_copy = pytest.mark.skipif(
    not OPENKBP_COPY.is_dir(), reason=f"full OpenKBP copy not found at {OPENKBP_COPY}"
)

# Voxel counts of pt_4 per organ. The CSV row counts are the same except
# Mandible (1664 rows), which loses one voxel to the smaller RightParotid.
PT_4_VOXEL_COUNTS = {
    "Brainstem": 817,
    "SpinalCord": 631,
    "RightParotid": 540,
    "LeftParotid": 581,
    "Esophagus": 185,
    "Larynx": 310,
    "Mandible": 1663,
}


@pytest.fixture(scope="module")
def sample_info():
    return load_dataset_info(SAMPLE_ROOT)


@pytest.fixture(scope="module")
def sample_case(sample_info):
    return load_dataset_case(sample_info, "pt_4")


def write_openkbp_patient(folder: Path, hu: np.ndarray, label: np.ndarray, spacing) -> Path:
    """Write arrays as an OpenKBP patient folder: sparse CT, one CSV per organ present."""
    folder.mkdir(parents=True)
    stored = hu.astype(np.int32).ravel() + 1024
    nonzero = np.flatnonzero(stored)
    rows = "".join(f"{index},{float(value)}\n" for index, value in zip(nonzero, stored[nonzero]))
    (folder / "ct.csv").write_text(",data\n" + rows)

    for name in OAR_NAMES:
        indexes = np.flatnonzero(label.ravel() == LABELS[name])
        if indexes.size:
            (folder / f"{name}.csv").write_text(",data\n" + "".join(f"{index},\n" for index in indexes))

    (folder / "voxel_dimensions.csv").write_text("".join(f"{size!r}\n" for size in spacing))
    return folder


def small_patient(folder: Path) -> Path:
    """Write a valid OpenKBP patient with air everywhere but a few voxels and two organs."""
    hu = np.full((128, 128, 128), -1024, dtype=np.int16)
    hu[60:64, 60:64, 10] = 40
    label = np.zeros((128, 128, 128), dtype=np.uint8)
    label[60:62, 60:62, 10] = LABELS["Brainstem"]
    label[62:64, 62:64, 10] = LABELS["Larynx"]
    return write_openkbp_patient(folder, hu, label, (4.0, 4.0, 2.5))


def save_case_files(folder: Path, image: np.ndarray, label: np.ndarray, image_spacing, label_spacing=None):
    """Save an image and a label NIfTI with the converter's writer, and return their paths."""
    image_path = folder / "case_0000.nii.gz"
    label_path = folder / "case.nii.gz"
    save_nifti(make_nifti(image, image_spacing), image_path)
    save_nifti(make_nifti(label, label_spacing or image_spacing), label_path)
    return image_path, label_path


# Shipped sample


def test_sample_dataset_info_splits(sample_info):
    assert sample_info.labels == LABELS
    assert list(sample_info.splits) == ["train", "validation", "test"]
    assert len(sample_info.splits["train"]) == 30
    assert len(sample_info.splits["validation"]) == 4
    assert len(sample_info.splits["test"]) == 9
    assert "pt_247" in sample_info.splits["test"]
    assert len(set(sample_info.case_ids)) == 43


def test_sample_dataset_json_fields():
    content = json.loads((SAMPLE_ROOT / "dataset.json").read_text())

    assert content["channel_names"] == {"0": "CT"}
    assert content["numTraining"] == 43
    assert content["file_ending"] == ".nii.gz"
    assert "ce625e62f3b04203f22bd9d1634f3e8fb0245e46" in content["source"]
    assert "MIT" in content["licence"]
    assert "Babier" in content["reference"]


def test_sample_size_within_limit():
    total_bytes = sum(path.stat().st_size for path in SAMPLE_ROOT.rglob("*") if path.is_file())
    assert total_bytes <= 25e6
    assert (SAMPLE_ROOT / "LICENSE").read_text().startswith("MIT License")


def test_sample_case_values(sample_case):
    assert sample_case.case_id == "pt_4"
    assert sample_case.image.shape == (128, 128, 128)
    assert sample_case.image.dtype == np.float32
    assert sample_case.image.min() == -1024.0
    assert sample_case.image.max() == 3047.0  # stored maximum 4071 minus 1024
    assert sample_case.label.dtype == np.uint8
    np.testing.assert_allclose(sample_case.spacing, (3.906, 3.906, 2.5), atol=1e-4)

    for name, count in PT_4_VOXEL_COUNTS.items():
        assert np.count_nonzero(sample_case.label == LABELS[name]) == count, name


def test_sample_case_geometry(sample_case):
    assert nib.aff2axcodes(sample_case.affine) == ("P", "L", "I")
    expected = np.array([[0, -3.906, 0, 0], [-3.906, 0, 0, 0], [0, 0, -2.5, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(sample_case.affine, expected, atol=1e-4)

    image = nib.load(SAMPLE_ROOT / "imagesTr" / "pt_4_0000.nii.gz")
    assert image.get_qform(coded=True)[1] == 1
    assert image.get_sform(coded=True)[1] == 1
    assert image.header.get_data_dtype() == np.int16
    assert image.header.get_xyzt_units()[0] == "mm"


def test_sample_case_anatomy(sample_case):
    def centroid(name):
        return np.argwhere(sample_case.label == LABELS[name]).mean(axis=0)  # (row, column, slice)

    # Columns run from patient right to left, rows from anterior to posterior,
    # slices from superior to inferior.
    assert centroid("RightParotid")[1] < centroid("LeftParotid")[1]
    assert centroid("Mandible")[0] < centroid("SpinalCord")[0]
    assert centroid("Brainstem")[2] < centroid("Esophagus")[2]


def test_sample_csv_round_trip(tmp_path, sample_case):
    # CT values are whole HU in [-1024, 3071], so the CSV export is exact.
    hu = sample_case.image.astype(np.int16)
    patient = write_openkbp_patient(tmp_path / "openkbp" / "pt_4", hu, sample_case.label, sample_case.spacing)

    out_root = convert_dataset([patient], tmp_path / "raw")
    converted = load_dataset_case(load_dataset_info(out_root), "pt_4")

    np.testing.assert_array_equal(converted.image, sample_case.image)
    np.testing.assert_array_equal(converted.label, sample_case.label)
    np.testing.assert_allclose(converted.affine, sample_case.affine, atol=1e-6)
    assert load_dataset_info(out_root).splits == {"train": ["pt_4"]}


# Original OpenKBP files


@pytest.mark.shared_data
@needs_openkbp_copy
def test_openkbp_conversion_matches_sample(tmp_path):
    patient = OPENKBP_COPY / "provided-data" / "train-pats" / "pt_4"
    convert_dataset([patient], tmp_path, {"train": ["pt_4"]})

    for relative in ("imagesTr/pt_4_0000.nii.gz", "labelsTr/pt_4.nii.gz"):
        assert (tmp_path / relative).read_bytes() == (SAMPLE_ROOT / relative).read_bytes(), relative


@pytest.mark.shared_data
@needs_openkbp_copy
def test_openkbp_overlap_counts():
    # pt_82 has 9 Brainstem/SpinalCord and 10 LeftParotid/Mandible overlapping voxels.
    patient = OPENKBP_COPY / "provided-data" / "train-pats" / "pt_82"
    hu, label, spacing = read_patient(patient)

    rows = {
        name: set(np.loadtxt(patient / f"{name}.csv", delimiter=",", skiprows=1, usecols=0, dtype=np.int64).tolist())
        for name in OAR_NAMES
    }
    for name in OAR_NAMES:
        smaller = set().union(*(rows[other] for other in OAR_NAMES if len(rows[other]) < len(rows[name])))
        expected = len(rows[name] - smaller)
        assert np.count_nonzero(label == LABELS[name]) == expected, name

    assert hu.dtype == np.int16
    assert hu.min() == -1024
    assert hu.max() <= 3071
    np.testing.assert_allclose(spacing, (4.688, 4.688, 3.0))


@pytest.mark.shared_data
@needs_openkbp_copy
def test_openkbp_discover_splits():
    patient_dirs, splits = discover_patients(OPENKBP_COPY / "provided-data")

    assert len(patient_dirs) == 43
    assert {split: len(ids) for split, ids in splits.items()} == {"train": 30, "validation": 4, "test": 9}
    assert splits["train"][:3] == ["pt_4", "pt_13", "pt_17"]


# OpenKBP reader


def test_read_patient_small(tmp_path, caplog):
    patient = small_patient(tmp_path / "pt_1")

    with caplog.at_level(logging.WARNING, logger="hurmacl_kit.data.openkbp"):
        hu, label, spacing = read_patient(patient)

    assert hu.dtype == np.int16
    assert hu[61, 61, 10] == 40
    assert hu[0, 0, 0] == -1024
    assert np.count_nonzero(label == LABELS["Brainstem"]) == 4
    assert np.count_nonzero(label == LABELS["Larynx"]) == 4
    assert spacing == (4.0, 4.0, 2.5)
    assert "Mandible.csv not found" in caplog.text


def test_read_patient_clips_ct(tmp_path):
    patient = small_patient(tmp_path / "pt_1")
    (patient / "ct.csv").write_text(",data\n5,32743.0\n6,3.0\n")

    hu, _, _ = read_patient(patient)

    assert hu.ravel()[5] == 3071
    assert hu.ravel()[6] == -1021


def test_read_patient_smaller_organ_wins(tmp_path):
    patient = small_patient(tmp_path / "pt_1")
    (patient / "Mandible.csv").write_text(",data\n" + "".join(f"{index},\n" for index in range(100, 110)))
    (patient / "RightParotid.csv").write_text(",data\n108,\n109,\n110,\n")

    _, label, _ = read_patient(patient)

    flat = label.ravel()
    assert flat[107] == LABELS["Mandible"]
    assert flat[108] == LABELS["RightParotid"]
    assert flat[109] == LABELS["RightParotid"]
    assert flat[110] == LABELS["RightParotid"]


def test_read_patient_tie_first_organ_wins(tmp_path):
    patient = small_patient(tmp_path / "pt_1")
    (patient / "Brainstem.csv").write_text(",data\n200,\n201,\n")
    (patient / "Larynx.csv").write_text(",data\n201,\n202,\n")

    _, label, _ = read_patient(patient)

    flat = label.ravel()
    assert flat[200] == LABELS["Brainstem"]
    assert flat[201] == LABELS["Brainstem"]
    assert flat[202] == LABELS["Larynx"]


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("ct.csv", "index,data\n1,5.0\n", "expected the header ',data'"),
        ("ct.csv", ",data\n1;5.0\n", "line 2: expected 'flat_index,value'"),
        ("ct.csv", ",data\n1,5.0\n2,\n", "line 3: expected 'flat_index,value'"),
        ("ct.csv", ",data\n1,abc\n", "value 'abc' is not a finite number"),
        ("ct.csv", ",data\n1.5,5.0\n", "line 2"),
        ("ct.csv", ",data\n-1,5.0\n", "line 2"),
        ("ct.csv", ",data\n2097152,5.0\n", "flat index 2097152 is out of range"),
        ("ct.csv", ",data\n7,5.0\n7,6.0\n", "flat index 7 appears more than once"),
        ("Brainstem.csv", ",data\n1,\n2,2\n", "must be empty or 1"),
        ("voxel_dimensions.csv", "4.0\n4.0\n", "three positive voxel sizes"),
        ("voxel_dimensions.csv", "4.0\n4.0\n-2.5\n", "three positive voxel sizes"),
        ("voxel_dimensions.csv", "4.0\nfour\n2.5\n", "expected three numbers"),
    ],
)
def test_read_patient_invalid_file(tmp_path, file_name, content, message):
    patient = small_patient(tmp_path / "pt_1")
    (patient / file_name).write_text(content)

    with pytest.raises(ValueError, match=message) as raised:
        read_patient(patient)

    assert str(patient / file_name) in str(raised.value)
    assert "Copy the patient folder again" in str(raised.value)


@pytest.mark.parametrize("file_name", ["ct.csv", "voxel_dimensions.csv"])
def test_read_patient_missing_file(tmp_path, file_name):
    patient = small_patient(tmp_path / "pt_1")
    (patient / file_name).unlink()

    with pytest.raises(ValueError, match=f"{file_name} not found"):
        read_patient(patient)


def test_convert_dataset_invalid_splits(tmp_path):
    patient = small_patient(tmp_path / "openkbp" / "pt_1")

    with pytest.raises(ValueError, match=r"not among the patient folders"):
        convert_dataset([patient], tmp_path / "raw", {"train": ["pt_1", "pt_2"]})
    with pytest.raises(ValueError, match=r"more than one split"):
        convert_dataset([patient], tmp_path / "raw", {"train": ["pt_1"], "test": ["pt_1"]})
    with pytest.raises(ValueError, match=r"in no split"):
        convert_dataset([patient], tmp_path / "raw", {"train": []})


def test_convert_dataset_rejects_other_cases(tmp_path):
    first = small_patient(tmp_path / "openkbp" / "pt_1")
    second = small_patient(tmp_path / "openkbp" / "pt_2")
    convert_dataset([first, second], tmp_path / "raw")

    with pytest.raises(ValueError, match=r"already contains cases \['pt_2'\]"):
        convert_dataset([first], tmp_path / "raw")


def test_discover_patients_flat_folder(tmp_path):
    for name in ("pt_13", "pt_4"):
        small_patient(tmp_path / name)

    patient_dirs, splits = discover_patients(tmp_path)
    assert [path.name for path in patient_dirs] == ["pt_4", "pt_13"]
    assert splits == {"train": ["pt_4", "pt_13"]}

    with pytest.raises(ValueError, match=r"\['pt_99'\] not found"):
        discover_patients(tmp_path, ["pt_99"])


# Case loading and validation


def test_load_case_shape_mismatch(tmp_path):
    image = np.zeros((8, 8, 4), dtype=np.int16)
    label = np.zeros((8, 8, 5), dtype=np.uint8)
    image_path, label_path = save_case_files(tmp_path, image, label, (1.0, 1.0, 2.0))

    with pytest.raises(DataValidationError, match=r"has shape \(8, 8, 5\), but .* has \(8, 8, 4\)") as raised:
        load_case(image_path, label_path)
    assert "Re-run the conversion" in str(raised.value)


def test_load_case_spacing_mismatch(tmp_path):
    image = np.zeros((8, 8, 4), dtype=np.int16)
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    image_path, label_path = save_case_files(tmp_path, image, label, (1.0, 1.0, 2.0), (1.0, 1.0, 3.0))

    with pytest.raises(DataValidationError, match=r"has spacing \(1.0, 1.0, 3.0\) mm") as raised:
        load_case(image_path, label_path)
    assert str(label_path) in str(raised.value)


def test_load_case_affine_mismatch(tmp_path):
    image = np.zeros((8, 8, 4), dtype=np.int16)
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    image_path, label_path = save_case_files(tmp_path, image, label, (1.0, 1.0, 2.0))
    moved = make_nifti(label, (1.0, 1.0, 2.0))
    affine = moved.affine.copy()
    affine[:3, 3] = (5.0, 0.0, 0.0)
    moved.set_qform(affine, code=1)
    moved.set_sform(affine, code=1)
    save_nifti(moved, label_path)

    with pytest.raises(DataValidationError, match=r"has affine"):
        load_case(image_path, label_path)


def test_load_case_unknown_label_value(tmp_path):
    image = np.zeros((8, 8, 4), dtype=np.int16)
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    label[1, 1, 1] = 9
    image_path, label_path = save_case_files(tmp_path, image, label, (1.0, 1.0, 2.0))

    with pytest.raises(DataValidationError, match=r"label value\(s\) \[9\] outside the label map"):
        load_case(image_path, label_path)


def test_load_case_nan_voxels(tmp_path):
    image = np.zeros((8, 8, 4), dtype=np.float32)
    image[0, 0, 0] = np.nan
    image[1, 0, 0] = np.inf
    image_path, label_path = save_case_files(tmp_path, image, np.zeros((8, 8, 4), dtype=np.uint8), (1.0, 1.0, 2.0))

    with pytest.raises(DataValidationError, match=r"has 2 NaN or infinite voxel\(s\)") as raised:
        load_case(image_path, label_path)
    assert str(image_path) in str(raised.value)


def test_load_case_not_3d(tmp_path):
    image_path = tmp_path / "case_0000.nii.gz"
    save_nifti(nib.Nifti1Image(np.zeros((8, 8, 4, 2), dtype=np.int16), np.eye(4)), image_path)

    with pytest.raises(DataValidationError, match=r"expected a 3D \(X, Y, Z\) volume"):
        load_case(image_path)


@pytest.mark.parametrize("kept_fraction", [0.5, 0.001])
def test_load_case_truncated_file(tmp_path, kept_fraction):
    source = SAMPLE_ROOT / "imagesTr" / "pt_4_0000.nii.gz"
    content = source.read_bytes()
    truncated = tmp_path / "pt_4_0000.nii.gz"
    truncated.write_bytes(content[: int(len(content) * kept_fraction)])

    with pytest.raises(DataValidationError, match="Re-run the conversion") as raised:
        load_case(truncated)
    assert str(truncated) in str(raised.value)
    assert raised.value.__cause__ is not None


def test_load_case_missing_file(tmp_path):
    with pytest.raises(DataValidationError, match="not found"):
        load_case(tmp_path / "absent_0000.nii.gz")


def test_dataset_info_missing_json(tmp_path):
    with pytest.raises(DataValidationError, match=r"dataset.json not found") as raised:
        load_dataset_info(tmp_path)
    assert "Re-run the conversion" in str(raised.value)


def test_dataset_info_invalid_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")

    with pytest.raises(DataValidationError, match="is not valid JSON"):
        load_dataset_info(tmp_path)


def test_dataset_info_missing_case_files(tmp_path):
    shutil.copytree(SAMPLE_ROOT, tmp_path / "openkbp")
    (tmp_path / "openkbp" / "labelsTr" / "pt_13.nii.gz").unlink()

    with pytest.raises(DataValidationError, match=r"files are missing: .*pt_13.nii.gz"):
        load_dataset_info(tmp_path / "openkbp")


def test_dataset_case_unknown_id(sample_info):
    with pytest.raises(DataValidationError, match=r"Case 'pt_1' is not listed"):
        load_dataset_case(sample_info, "pt_1")


def test_window_hu_range():
    windowed = window_hu(np.array([-1024.0, -250.0, 250.0, 750.0, 3000.0]))

    assert windowed.dtype == np.float32
    np.testing.assert_allclose(windowed, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="lower < upper"):
        window_hu(np.zeros(3), lower=100.0, upper=100.0)


# Slice dataset


def make_case(label: np.ndarray, case_id: str = "synthetic") -> Case:
    """Build a case whose image is a ramp over all voxels, so every slice and column differs."""
    image = np.linspace(-500.0, 1000.0, label.size, dtype=np.float32).reshape(label.shape)
    return Case(case_id=case_id, image=image, label=label, spacing=(1.0, 1.0, 2.0), affine=np.eye(4))


def test_slice_dataset_shapes(sample_case):
    dataset = SliceDataset([sample_case], context=1)
    sample = dataset[40]

    assert len(dataset) == 128
    assert sample["image"].shape == (3, 128, 128)
    assert sample["image"].dtype == torch.float32
    assert sample["label"].shape == (128, 128)
    assert sample["label"].dtype == torch.int64
    assert sample["case_id"] == "pt_4"
    assert sample["slice_index"] == 40

    windowed = window_hu(sample_case.image)
    for channel, z in enumerate((39, 40, 41)):
        np.testing.assert_array_equal(sample["image"][channel].numpy(), windowed[:, :, z])
    np.testing.assert_array_equal(sample["label"].numpy(), sample_case.label[:, :, 40])


def test_slice_dataset_edge_replicates():
    case = make_case(np.zeros((8, 8, 6), dtype=np.uint8))
    dataset = SliceDataset([case], context=2)
    first = dataset[0]["image"]
    last = dataset[5]["image"]

    assert first.shape == (5, 8, 8)
    for channel in (0, 1):
        assert torch.equal(first[channel], first[2])
        assert torch.equal(last[4 - channel], last[2])
    assert not torch.equal(first[3], first[2])


def test_slice_dataset_center_crop():
    case = make_case(np.zeros((12, 10, 3), dtype=np.uint8))
    sample = SliceDataset([case], context=0, patch_size=6)[1]

    expected = window_hu(case.image)[3:9, 2:8, 1]
    np.testing.assert_array_equal(sample["image"][0].numpy(), expected)
    assert sample["label"].shape == (6, 6)


def test_slice_dataset_random_crop_size(sample_case):
    dataset = SliceDataset([sample_case], patch_size=64, augment=True)

    for index in (0, 40, 127):
        assert dataset[index]["image"].shape == (3, 64, 64)
        assert dataset[index]["label"].shape == (64, 64)


def test_slice_dataset_flip_swaps_parotids(sample_case):
    z = 40  # contains both parotids
    original = sample_case.label[:, :, z]
    swapped = original[:, ::-1].copy()
    right, left = LABELS["RightParotid"], LABELS["LeftParotid"]
    swapped[original[:, ::-1] == right] = left
    swapped[original[:, ::-1] == left] = right
    dataset = SliceDataset([sample_case], augment=True)

    outcomes = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        label = dataset[z]["label"].numpy()
        flipped = np.array_equal(label, swapped)
        assert flipped or np.array_equal(label, original), epoch
        outcomes.add(flipped)

    assert outcomes == {True, False}
    assert np.count_nonzero(swapped == right) == np.count_nonzero(original == left)


def test_slice_dataset_no_augment_unchanged(sample_case):
    dataset = SliceDataset([sample_case], augment=False)
    expected = window_hu(sample_case.image)[:, :, 40]

    for epoch in range(3):
        dataset.set_epoch(epoch)
        np.testing.assert_array_equal(dataset[40]["image"][1].numpy(), expected)


def test_slice_dataset_augment_bounded(sample_case):
    dataset = SliceDataset([sample_case], augment=True)
    plain = SliceDataset([sample_case])[40]["image"]
    augmented = dataset[40]["image"]

    # Even after a flip, the intensity distribution stays close: scale within
    # 10%, shift within 0.05 and noise with a standard deviation of 0.01.
    assert abs(float(augmented.mean() - plain.mean())) < 0.1
    assert not torch.equal(augmented, plain)


def test_slice_dataset_deterministic_by_seed(sample_case):
    first = SliceDataset([sample_case], patch_size=64, augment=True, seed=7)
    second = SliceDataset([sample_case], patch_size=64, augment=True, seed=7)
    other = SliceDataset([sample_case], patch_size=64, augment=True, seed=8)

    for index in (10, 40, 90):
        assert torch.equal(first[index]["image"], second[index]["image"])
        assert torch.equal(first[index]["label"], second[index]["label"])
        assert torch.equal(first[index]["image"], first[index]["image"])
        assert not torch.equal(first[index]["image"], other[index]["image"])


def test_slice_weights_favour_small_organs():
    label = np.zeros((16, 16, 6), dtype=np.uint8)
    label[0:2, 0:1, 0] = LABELS["Esophagus"]  # 2 voxels in all
    label[0:4, 0:5, 1:4] = LABELS["Mandible"]  # 20 voxels on each of slices 1 to 3

    weights = compute_slice_weights([label], background_fraction=0.2)

    assert weights.shape == (6,)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] > weights[1]
    # Raw weights: 1/2 for the Esophagus slice, 1/60 for each Mandible slice.
    assert weights[0] == pytest.approx(0.8 * (1 / 2) / (1 / 2 + 3 / 60))
    assert weights[1] == pytest.approx(weights[3])
    assert weights[4] == pytest.approx(0.1)
    assert weights[4:].sum() == pytest.approx(0.2)


def test_slice_weights_sample(sample_case):
    dataset = SliceDataset([sample_case], background_fraction=0.3)
    weights = dataset.slice_weights
    values_per_slice = [set(np.unique(sample_case.label[:, :, z]).tolist()) for z in range(128)]
    has_organ = np.array([values != {0} for values in values_per_slice])
    cord_and_esophagus = np.array([values == {0, 2, 5} for values in values_per_slice])
    cord_and_larynx = np.array([values == {0, 2, 6} for values in values_per_slice])

    assert weights.shape == (len(dataset),)
    assert weights[~has_organ].sum() == pytest.approx(0.3)
    # pt_4 has 185 Esophagus voxels and 310 Larynx voxels.
    assert cord_and_esophagus.any()
    assert cord_and_larynx.any()
    assert weights[cord_and_esophagus].min() > weights[cord_and_larynx].max()
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=256, generator=torch.Generator().manual_seed(0))
    assert len(list(sampler)) == 256


def test_volume_slices_match_dataset(sample_case):
    volume = volume_slices(sample_case, context=1)
    dataset = SliceDataset([sample_case], context=1)

    assert volume.shape == (128, 3, 128, 128)
    assert volume.dtype == torch.float32
    for z in (0, 64, 127):
        assert torch.equal(volume[z], dataset[z]["image"])


def test_slice_dataset_invalid_arguments(sample_case):
    unlabelled = Case("pt_x", sample_case.image, None, sample_case.spacing, sample_case.affine)

    with pytest.raises(ValueError, match="has no label"):
        SliceDataset([unlabelled])
    with pytest.raises(ValueError, match="patch_size 200 does not fit"):
        SliceDataset([sample_case], patch_size=200)
    with pytest.raises(ValueError, match="background_fraction"):
        SliceDataset([sample_case], background_fraction=1.0)
    with pytest.raises(ValueError, match="context"):
        SliceDataset([sample_case], context=-1)


def test_saved_gzip_is_deterministic(tmp_path):
    image = make_nifti(np.arange(64, dtype=np.int16).reshape(4, 4, 4), (1.0, 1.0, 2.0))
    save_nifti(image, tmp_path / "a.nii.gz")
    save_nifti(image, tmp_path / "b.nii.gz")

    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes()) == image.to_bytes()
