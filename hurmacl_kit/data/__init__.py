"""Data layer: OpenKBP conversion, converted-case loading and 2D slice datasets.

Typical use::

    import torch
    from hurmacl_kit import data

    info = data.load_dataset_info("sample_data/openkbp")
    cases = [data.load_dataset_case(info, case_id) for case_id in info.splits["train"]]
    dataset = data.SliceDataset(cases, context=1, patch_size=96, augment=True)
    sampler = torch.utils.data.WeightedRandomSampler(dataset.slice_weights, num_samples=len(dataset))
"""

from hurmacl_kit.data.cases import (
    WINDOW_LOWER_HU,
    WINDOW_UPPER_HU,
    Case,
    DataValidationError,
    DatasetInfo,
    case_paths,
    load_case,
    load_dataset_case,
    load_dataset_info,
    window_hu,
)
from hurmacl_kit.data.openkbp import (
    LABELS,
    OAR_NAMES,
    build_dataset_json,
    convert_dataset,
    discover_patients,
    make_nifti,
    openkbp_affine,
    read_patient,
    save_nifti,
)
from hurmacl_kit.data.slices import SliceDataset, compute_slice_weights, neighbour_indices, volume_slices

__all__ = [
    "LABELS",
    "OAR_NAMES",
    "WINDOW_LOWER_HU",
    "WINDOW_UPPER_HU",
    "Case",
    "DataValidationError",
    "DatasetInfo",
    "SliceDataset",
    "build_dataset_json",
    "case_paths",
    "compute_slice_weights",
    "convert_dataset",
    "discover_patients",
    "load_case",
    "load_dataset_case",
    "load_dataset_info",
    "make_nifti",
    "neighbour_indices",
    "openkbp_affine",
    "read_patient",
    "save_nifti",
    "volume_slices",
    "window_hu",
]
