"""One HUR-MACL training step against the U-Net baseline on real OpenKBP slices.

Setup: 128 x 128 whole axial slices from ``sample_data/openkbp`` (the
validation split, 4 patients, to keep loading short) drawn with
``hurmacl_kit.engine.train.draw_batch``, batch 8, 3 input slices, SGD
Nesterov 0.99. A step is forward, ``compute_loss``, backward, gradient
clipping and the optimiser step, as in ``engine.train``.

The hard fraction is controlled through the threshold T: the models are
untrained, so at T = 0.001 about every pixel is hard (the 100% rows), and
for the 10% rows T is set per batch to the 90th percentile of the U-Net's
uncertainty pooled over the four levels. The printed hard fraction is the one
``compute_loss`` measured, pooled over all four levels.

Models: the default ``HURMACLConfig`` sizes and the CPU preset
(``hurmacl_kit.engine.presets.CPU_BRANCHES``). Target: HUR-MACL at most
1.5x the U-Net step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, median_seconds, print_table, verdict  # noqa: E402

from hurmacl_kit import uncertainty as unc  # noqa: E402
from hurmacl_kit.engine.presets import CPU_BRANCHES  # noqa: E402
from hurmacl_kit.engine.train import TrainConfig, build_training_set, draw_batch  # noqa: E402
from hurmacl_kit.models import HURMACL, HURMACLConfig  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
SIZES = {"default": {}, "cpu preset": CPU_BRANCHES}


def load_batch(batch_size: int = 8, split: str = "validation", step: int = 0) -> dict:
    """Return one real (image, label) batch of 128 x 128 slices."""
    config = TrainConfig(
        data_root=str(REPOSITORY / "sample_data" / "openkbp"), output_dir="unused",
        train_split=split, batch_size=batch_size, patch_size=None,
    )
    dataset, _ = build_training_set(config)
    return draw_batch(dataset, step, config)


def build(ablation: str, sizes: dict, in_channels: int) -> tuple[HURMACL, torch.optim.Optimizer]:
    torch.manual_seed(42)
    model = HURMACL(HURMACLConfig.from_ablation(ablation, in_channels=in_channels, num_classes=8, **sizes))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
    return model, optimizer


def threshold_for_fraction(model: HURMACL, image: torch.Tensor, fraction: float) -> float:
    """Return T giving about ``fraction`` hard pixels pooled over the HURM levels (default T for 1.0)."""
    if fraction >= 1.0:
        return unc.DEFAULT_THRESHOLD
    with torch.no_grad():
        levels = model.unet(image)
        pooled = torch.cat([
            unc.normalized_entropy(torch.softmax(levels[level], dim=1)).flatten() for level in model.config.hurm_levels
        ])
    return float(torch.quantile(pooled.double(), 1.0 - fraction))


def training_step(model: HURMACL, optimizer, image: torch.Tensor, label: torch.Tensor) -> float:
    """Run one optimiser step and return the pooled hard fraction."""
    model.train()
    losses = model.compute_loss(model(image), label)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
    optimizer.step()
    return losses.hard_fraction


def configurations(quick: bool) -> list[tuple[str, str, str, float]]:
    """Return (label, ablation, sizes key, target hard fraction) rows."""
    rows = []
    for sizes in (("cpu preset",) if quick else ("default", "cpu preset")):
        rows.append((f"U-Net ({sizes} backbone)", "unet", sizes, 1.0))
        for fraction in (0.1, 1.0):
            rows.append((f"HUR-MACL {sizes}, {fraction:.0%} hard", "hurmacl", sizes, fraction))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU preset only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 3, quick 2)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)

    print(machine_info())
    batch = load_batch(args.batch)
    image, label = batch["image"], batch["label"]
    print(f"batch: image {tuple(image.shape)}, label {tuple(label.shape)}, organ pixels {int((label > 0).sum())}")

    rows, results, baseline = [], [], None
    for name, ablation, sizes, fraction in configurations(args.quick):
        model, optimizer = build(ablation, SIZES[sizes], image.shape[1])
        model.config.threshold = threshold_for_fraction(model, image, fraction)
        hard = training_step(model, optimizer, image, label)
        seconds = median_seconds(lambda: training_step(model, optimizer, image, label), repeats, warmup=0)
        if ablation == "unet":
            baseline, hard = seconds, float("nan")
        ratio = seconds / baseline
        met = None if ablation == "unet" else ratio <= 1.5
        if met is not None:
            results.append(met)
        rows.append([name, model.config.threshold, hard, seconds, ratio, "-" if met is None else verdict(met)])
        print(f"{name}: {seconds:.2f} s, {ratio:.2f}x U-Net", flush=True)

    print()
    print_table(["model", "T", "hard fraction", "step s", "vs U-Net", "target <= 1.5x"], rows)
    print(f"128 x 128, batch {args.batch}, real OpenKBP slices, forward + loss + backward + SGD, median of {repeats}")
    print(f"RESULT training step: {verdict(all(results))} (HUR-MACL at most 1.5x the U-Net step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
