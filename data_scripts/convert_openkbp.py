"""Convert OpenKBP patient folders to the nnU-Net raw layout (NIfTI + dataset.json).

Run from the repository root with hurmacl-kit installed (``pip install -e .``).
Examples::

    python data_scripts/convert_openkbp.py ../open-kbp/provided-data --out data/openkbp_raw
    python data_scripts/convert_openkbp.py ../open-kbp/provided-data --out data/small --patients pt_4 pt_13
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hurmacl_kit.data import convert_dataset, discover_patients

logger = logging.getLogger("convert_openkbp")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Convert OpenKBP head-and-neck patients (sparse CSV) into the nnU-Net raw layout: "
            "imagesTr/{case}_0000.nii.gz (int16 HU), labelsTr/{case}.nii.gz (uint8, 7 organs at risk) "
            "and dataset.json with the splits."
        ),
        epilog=(
            "SOURCE may be the OpenKBP provided-data folder (its train-pats, validation-pats and test-pats "
            "become the splits train, validation and test), a folder of patient folders (all go to train), "
            "or one patient folder."
        ),
    )
    parser.add_argument("source", type=Path, help="OpenKBP provided-data folder, folder of patient folders, or one patient folder.")
    parser.add_argument("--out", type=Path, required=True, help="Output dataset folder, created if missing.")
    parser.add_argument(
        "--patients", nargs="+", metavar="NAME", help="Patient folder names to convert, such as pt_4 pt_13. Default: all."
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging level (default: INFO)."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=arguments.log_level, format="%(levelname)s %(name)s: %(message)s")

    try:
        patient_dirs, splits = discover_patients(arguments.source, arguments.patients)
        convert_dataset(patient_dirs, arguments.out, splits)
    except ValueError as error:
        logger.error("%s", error)
        return 1

    summary = ", ".join(f"{split}: {len(ids)}" for split, ids in splits.items())
    logger.info("Converted %d patient(s) (%s) to %s", len(patient_dirs), summary, arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
