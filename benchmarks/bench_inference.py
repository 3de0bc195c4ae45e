"""Whole-volume inference of one 128^3 OpenKBP CT: label map plus uncertainty map.

Runs ``hurmacl_kit.engine.predict.predict_case`` (its default batch, 3 input
slices each) on the first test case of ``sample_data/openkbp`` with
untrained models, for the U-Net baseline and for HUR-MACL (default and CPU
preset sizes, inference rule "average", branches at level 0 only).

HUR-MACL's cost depends on the hard fraction. The untrained U-Net is
uncertain almost everywhere, so T = 0.001 gives about 100% hard voxels (the
worst case). For the 10% rows each slice's hard region is the 10% of its
pixels nearest to an organ boundary (``common.boundary_band``), the shape of
a trained model's hard region. When ``--checkpoint`` names a trained model
(``make demo`` writes one), a last row runs it at T = 0.001 with the hard
region it really produces. Each HUR-MACL row is timed alternately with the
U-Net, and its ratio divides by the U-Net runs of that pair, so that a drift
of the machine during the run does not bias it. Targets, on a partly hard volume: at most 3 s
per volume on 2 cores and at most 1.3x the U-Net. The 100% rows show the
worst case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_checkpoint_argument, boundary_band, forced_hard_regions, machine_info, median_seconds, paired_median_seconds,
    print_table, verdict,
)

from hurmacl_kit import data  # noqa: E402
from hurmacl_kit import uncertainty as unc  # noqa: E402
from hurmacl_kit.engine.checkpoint import load_model  # noqa: E402
from hurmacl_kit.engine.predict import default_batch_size, predict_case  # noqa: E402
from hurmacl_kit.engine.presets import CPU_BRANCHES  # noqa: E402
from hurmacl_kit.models import HURMACL, HURMACLConfig  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
SIZES = {"default": {}, "cpu preset": CPU_BRANCHES}


def build(ablation: str, sizes: dict) -> HURMACL:
    torch.manual_seed(42)  # the same U-Net weights in every model
    return HURMACL(HURMACLConfig.from_ablation(ablation, in_channels=3, num_classes=8, **sizes)).eval()


class SliceBands:
    """Return the boundary bands of consecutive axial slices, in the order ``predict_case`` runs them."""

    def __init__(self, label_xyz: np.ndarray, fraction: float):
        label_zxy = torch.from_numpy(np.ascontiguousarray(label_xyz.transpose(2, 0, 1))).long()
        self.masks = boundary_band(label_zxy, fraction)  # (Z, X, Y)
        self.start = 0

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        count = values.shape[0]
        masks = self.masks[self.start : self.start + count]
        if masks.shape != values.shape:
            raise RuntimeError(f"slice bands {tuple(masks.shape)} do not match the uncertainty {tuple(values.shape)}")
        self.start += count
        return masks.to(values.device)

    @property
    def fraction(self) -> float:
        return float(self.masks.float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU preset only, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 2, quick 1)")
    add_checkpoint_argument(parser)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)

    print(machine_info())
    info = data.load_dataset_info(REPOSITORY / "sample_data" / "openkbp")
    case_id = info.splits["test"][0]
    case = data.load_dataset_case(info, case_id)
    print(f"case {case_id}: volume {case.image.shape}")

    baseline_model = build("unet", {})
    # The first volume of a process is slower than the next ones, so the U-Net, which runs first, gets an untimed run.
    predictions = []
    baseline = median_seconds(lambda: predictions.append(predict_case(baseline_model, case, context=1)), repeats, warmup=1)
    rows = [["U-Net", "-", "-", baseline, "-", 1.0, verdict(baseline <= 3.0), "-"]]
    results = [("U-Net", baseline <= 3.0, None)]

    def run_baseline():
        predict_case(baseline_model, case, context=1)

    def timed(model: HURMACL, band_fraction: float | None) -> tuple[float, float, float]:
        """Return (seconds, U-Net seconds, hard fraction), timing the model and the U-Net alternately."""
        if band_fraction is None:
            seconds, unet_seconds = paired_median_seconds(
                lambda: predictions.append(predict_case(model, case, context=1)), run_baseline, repeats
            )
            return seconds, unet_seconds, predictions[-1].hard_fraction
        bands = SliceBands(case.label, band_fraction)  # built once, outside the timed runs

        def run():
            bands.start = 0
            with forced_hard_regions(bands):
                predict_case(model, case, context=1)

        seconds, unet_seconds = paired_median_seconds(run, run_baseline, repeats)
        return seconds, unet_seconds, bands.fraction

    runs = [(sizes, fraction) for sizes in (("cpu preset",) if args.quick else ("default", "cpu preset")) for fraction in (0.1, 1.0)]
    if args.checkpoint and Path(args.checkpoint).is_file():
        runs.append(("demo checkpoint", None))
    for sizes, fraction in runs:
        if fraction is None:
            model, _ = load_model(args.checkpoint)
            model.config.threshold = unc.DEFAULT_THRESHOLD
        else:
            model = build("hurmacl", SIZES[sizes])
        seconds, unet_seconds, hard = timed(model, fraction if fraction is not None and fraction < 1.0 else None)
        ratio = seconds / unet_seconds
        partly_hard = fraction is None or fraction < 1.0
        region = "band" if fraction is not None and fraction < 1.0 else f"T = {unc.DEFAULT_THRESHOLD:g}"
        if partly_hard:
            results.append((f"HUR-MACL {sizes}, {hard:.1%} hard", seconds <= 3.0, ratio <= 1.3))
        rows.append([
            f"HUR-MACL {sizes}", region, hard, seconds, unet_seconds, ratio,
            verdict(seconds <= 3.0) if partly_hard else "-", verdict(ratio <= 1.3) if partly_hard else "-",
        ])
        print(f"HUR-MACL {sizes}, hard {hard:.1%}: {seconds:.2f} s, {ratio:.2f}x U-Net", flush=True)

    print()
    print_table(["model", "hard region", "hard fraction", "seconds", "paired U-Net s", "vs U-Net", "<= 3 s", "<= 1.3x"], rows)
    print(f"one 128^3 volume, predict_case batch {default_batch_size(torch.device('cpu'))}, median of {repeats}")
    for name, fast_enough, ratio_met in results:
        ratio_text = "" if ratio_met is None else f", {verdict(ratio_met)} at most 1.3x the U-Net"
        print(f"RESULT inference, {name}: {verdict(fast_enough)} at most 3 s per 128^3 volume{ratio_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
