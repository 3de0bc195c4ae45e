"""Rebuild the shipped sample ``sample_data/openkbp`` from a copy of the OpenKBP repository.

The sample contains all 43 OpenKBP patients of ``provided-data`` converted to the
nnU-Net raw layout, with splits train (train-pats, 30), validation
(validation-pats, 4) and test (test-pats, 9), plus ``LICENSE`` and
``README.md``. The output is byte-identical across runs for the same input,
because the conversion writes gzip with a zero timestamp.

Run from the repository root, with hurmacl-kit installed::

    python data_scripts/make_sample.py --source PATH/TO/open-kbp
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from hurmacl_kit.data import convert_dataset, discover_patients
from hurmacl_kit.data.openkbp import SPLIT_FOLDERS

logger = logging.getLogger("make_sample")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
OPENKBP_REPOSITORY = "https://github.com/ababier/open-kbp"
OPENKBP_COMMIT = "ce625e62f3b04203f22bd9d1634f3e8fb0245e46"
MAX_SAMPLE_MEGABYTES = 25.0

README_TEMPLATE = """\
# OpenKBP sample (real head-and-neck CT, nnU-Net raw layout)

{count} real head-and-neck cancer planning CTs with seven clinical organ-at-risk
contours, converted from OpenKBP for the hurmacl-kit tests, notebooks and
quick experiments. Voxels are 3.9 to 5.4 mm in-plane with 2.5 or 3.0 mm
slices. Total size: {megabytes:.1f} MB.

- Source: {repository}, commit `{commit}`, folder `provided-data/`.
- Licence: MIT, the licence of the OpenKBP repository (copy in `LICENSE`).
  The CT images originate from The Cancer Imaging Archive (TCIA)
  head-and-neck collections.
- Cite: A. Babier et al., "OpenKBP: The open-access knowledge-based planning
  grand challenge and dataset", Medical Physics 48(9):5549-5561, 2021.

## Cases and splits

The splits in `dataset.json` follow the OpenKBP folders.

| split | OpenKBP folder | cases |
| --- | --- | --- |
{split_rows}

## Layout

- `imagesTr/{{case}}_0000.nii.gz`: CT in HU, int16, 128 x 128 x 128, clipped
  to [-1024, 3071] HU.
- `labelsTr/{{case}}.nii.gz`: uint8 label map, 0 background, 1 Brainstem,
  2 SpinalCord, 3 RightParotid, 4 LeftParotid, 5 Esophagus, 6 Larynx,
  7 Mandible. Where two organ masks overlap (up to 13 voxels per organ pair
  in these patients, mostly brainstem with spinal cord and parotid with
  mandible), the organ with fewer voxels in that patient keeps the voxel.
  Targets (PTV) are left out.
- `dataset.json`: nnU-Net v2 metadata plus `licence`, `reference`, `source`
  and `splits`.

Arrays keep the OpenKBP axis order (row, column, slice), so an axial slice
is `array[:, :, k]`. The affine maps them to RAS+ mm with axis codes
('P', 'L', 'I'). OpenKBP stores no patient position, so voxel (0, 0, 0) is at
the world origin.

## Rebuild

`data_scripts/make_sample.py` writes this folder, this README included, so
edit the script rather than the files here. From the repository root, with
hurmacl-kit installed (`pip install -e .`) and a checkout of the OpenKBP
repository at the commit above:

    python data_scripts/make_sample.py --source PATH/TO/open-kbp

The script converts every patient with `hurmacl_kit.data.convert_dataset`
(gzip level 9, zero timestamp), so a rebuild from the same input is
byte-identical.
"""


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rebuild sample_data/openkbp from an OpenKBP repository copy (folder with LICENSE and provided-data/)."
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=REPOSITORY_ROOT.parent / "shared" / "data" / "openkbp",
        help="OpenKBP repository copy with LICENSE and provided-data/ (default: ../shared/data/openkbp beside the repository).",
    )
    parser.add_argument(
        "--out", type=Path, default=REPOSITORY_ROOT / "sample_data" / "openkbp", help="Sample folder to replace."
    )
    parser.add_argument("--commit", default=OPENKBP_COMMIT, help="OpenKBP commit of --source, recorded in README.md and dataset.json.")
    parser.add_argument(
        "--max-mb", type=float, default=MAX_SAMPLE_MEGABYTES, help="Maximum sample size in MB (10^6 bytes)."
    )
    return parser.parse_args(argv)


def build_sample(source: Path, out: Path, commit: str, max_megabytes: float) -> None:
    """Convert all patients of ``source`` into a fresh folder, then replace ``out`` with it.

    Raises:
        ValueError: If ``source`` lacks LICENSE or provided-data/, or the
            sample would exceed ``max_megabytes``. ``out`` is then unchanged.
    """
    licence = source / "LICENSE"
    if not licence.is_file() or not (source / "provided-data").is_dir():
        raise ValueError(f"{source} must contain LICENSE and provided-data/. Pass --source PATH/TO/open-kbp.")
    patient_dirs, splits = discover_patients(source / "provided-data")

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as temporary:
        build = Path(temporary) / out.name
        convert_dataset(patient_dirs, build, splits, source=f"{OPENKBP_REPOSITORY}, commit {commit}, folder provided-data/")
        shutil.copyfile(licence, build / "LICENSE")

        megabytes = _folder_bytes(build) / 1e6
        (build / "README.md").write_text(_readme(splits, commit, megabytes), encoding="utf-8")
        megabytes = _folder_bytes(build) / 1e6
        if megabytes > max_megabytes:
            raise ValueError(f"The sample would take {megabytes:.1f} MB, above --max-mb {max_megabytes}. {out} is unchanged.")

        if out.exists():
            shutil.rmtree(out)
        build.rename(out)

    logger.info("Wrote %s: %d cases, %.1f MB", out, len(patient_dirs), megabytes)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _readme(splits: dict[str, list[str]], commit: str, megabytes: float) -> str:
    folders = {split: folder for folder, split in SPLIT_FOLDERS.items()}
    split_rows = "\n".join(
        f"| {split} | `{folders.get(split, '')}` | {len(ids)}: {', '.join(ids)} |" for split, ids in splits.items()
    )
    count = sum(len(ids) for ids in splits.values())
    return README_TEMPLATE.format(
        count=count, megabytes=megabytes, repository=OPENKBP_REPOSITORY, commit=commit, split_rows=split_rows
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build_sample(arguments.source, arguments.out, arguments.commit, arguments.max_mb)
    except ValueError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
