"""Whole-volume inference of one 128^3 OpenKBP CT: label map plus uncertainty map.

Runs ``hurmacl_kit.engine.predict.predict_case`` (batch 16 slices, 3 input
slices each) on the first test case of ``sample_data/openkbp`` with
untrained models, for the U-Net baseline and for HUR-MACL (default and CPU
preset sizes, inference rule "average", branches at level 0 only).

HUR-MACL's cost depends on the hard fraction. The untrained U-Net is
uncertain almost everywhere, so T = 0.001 gives about 100% hard voxels (the
worst case); the 10% rows set T to the 90th percentile of the U-Net's
uncertainty over the volume. Targets: at most 3 s per volume on 2 cores and
at most 1.3x the U-Net.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, median_seconds, print_table, verdict  # noqa: E402

from hurmacl_kit import data  # noqa: E402
from hurmacl_kit import uncertainty as unc  # noqa: E402
from hurmacl_kit.engine.predict import predict_case  # noqa: E402
from hurmacl_kit.engine.presets import CPU_BRANCHES  # noqa: E402
from hurmacl_kit.models import HURMACL, HURMACLConfig  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
SIZES = {"default": {}, "cpu preset": CPU_BRANCHES}


def build(ablation: str, sizes: dict) -> HURMACL:
    torch.manual_seed(42)  # the same U-Net weights in every model
    return HURMACL(HURMACLConfig.from_ablation(ablation, in_channels=3, num_classes=8, **sizes)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU preset only, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 2, quick 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)

    print(machine_info())
    info = data.load_dataset_info(REPOSITORY / "sample_data" / "openkbp")
    case_id = info.splits["test"][0]
    case = data.load_dataset_case(info, case_id)
    print(f"case {case_id}: volume {case.image.shape}")

    baseline_model = build("unet", {})
    # A whole volume takes seconds, so one-time start-up costs are negligible and there is no warm-up run.
    predictions = []
    baseline = median_seconds(lambda: predictions.append(predict_case(baseline_model, case, context=1)), repeats, warmup=0)
    uncertainty = predictions[-1].uncertainty
    threshold_10 = float(np.quantile(uncertainty, 0.9))
    rows = [["U-Net", unc.DEFAULT_THRESHOLD, "-", baseline, 1.0, verdict(baseline <= 3.0), "-"]]
    met = baseline <= 3.0

    for sizes in ("cpu preset",) if args.quick else ("default", "cpu preset"):
        for threshold in (threshold_10, unc.DEFAULT_THRESHOLD):
            model = build("hurmacl", SIZES[sizes])
            model.config.threshold = threshold
            seconds = median_seconds(lambda: predictions.append(predict_case(model, case, context=1)), repeats, warmup=0)
            hard = predictions[-1].hard_fraction
            ratio = seconds / baseline
            met = met and seconds <= 3.0 and ratio <= 1.3
            rows.append([f"HUR-MACL {sizes}", threshold, hard, seconds, ratio, verdict(seconds <= 3.0), verdict(ratio <= 1.3)])
            print(f"HUR-MACL {sizes}, hard {hard:.1%}: {seconds:.2f} s, {ratio:.2f}x U-Net", flush=True)

    print()
    print_table(["model", "T", "hard fraction", "seconds", "vs U-Net", "<= 3 s", "<= 1.3x"], rows)
    print(f"one 128^3 volume, predict_case batch 16, median of {repeats}")
    print(f"RESULT inference: {verdict(met)} (at most 3 s per volume and at most 1.3x the U-Net)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
