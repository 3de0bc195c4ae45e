"""One HUR-MACL training step against the U-Net baseline on real OpenKBP slices.

Setup: 128 x 128 whole axial slices from ``sample_data/openkbp`` (the
validation split, 4 patients, to keep loading short) drawn with
``hurmacl_kit.engine.train.draw_batch``, batch 8, 3 input slices, SGD
Nesterov 0.99. A step is forward, ``compute_loss``, backward, gradient
clipping and the optimiser step, as in ``engine.train``.

Hard fraction. The models are untrained, so at T = 0.001 every pixel is
hard: the 100% rows. For the 10% rows each level's hard region is the 10%
of pixels nearest to an organ boundary of that level's labels
(``common.boundary_band``), the shape of a trained model's hard region; an
untrained model's most uncertain 10% is scattered noise that touches every
ViM patch. When ``--checkpoint`` names a trained model (``make demo``
writes one), a last row times it at T = 0.001 with the hard region it
really produces.

Models: the default ``HURMACLConfig`` sizes and the CPU preset
(``hurmacl_kit.engine.presets.CPU_BRANCHES``). Target: HUR-MACL at most
1.5x the U-Net step on a partly hard image (the 10% and checkpoint rows);
the 100% rows are printed to show the cost growing with the hard region.
Each HUR-MACL row is timed alternately with the U-Net of the same sizes
("paired U-Net s"), and its ratio divides by those U-Net runs.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_checkpoint_argument, boundary_band, forced_hard_regions, machine_info, median_seconds, paired_median_seconds,
    print_table, verdict,
)

from hurmacl_kit.engine.presets import CPU_BRANCHES  # noqa: E402
from hurmacl_kit.engine.checkpoint import load_model  # noqa: E402
from hurmacl_kit.engine.train import TrainConfig, build_training_set, draw_batch  # noqa: E402
from hurmacl_kit.models import HURMACL, HURMACLConfig  # noqa: E402
from hurmacl_kit.models.losses import downsample_labels  # noqa: E402

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


def build(ablation: str, sizes: dict, in_channels: int, checkpoint: Path | None = None):
    """Return (model, optimizer): a fresh ablation row, or the model stored in ``checkpoint``."""
    torch.manual_seed(42)
    if checkpoint is not None:
        model, _ = load_model(checkpoint)
    else:
        model = HURMACL(HURMACLConfig.from_ablation(ablation, in_channels=in_channels, num_classes=8, **sizes))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
    return model, optimizer


def band_masks(label: torch.Tensor, fraction: float, levels: int = 4) -> dict:
    """Return {(H, W): (B, H, W) bool} boundary-band masks for each decoder level's size."""
    masks = {}
    for level in range(levels):
        size = (label.shape[-2] >> level, label.shape[-1] >> level)
        masks[size] = boundary_band(downsample_labels(label, size), fraction)
    return masks


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
    add_checkpoint_argument(parser)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)

    print(machine_info())
    batch = load_batch(args.batch)
    image, label = batch["image"], batch["label"]
    print(f"batch: image {tuple(image.shape)}, label {tuple(label.shape)}, organ pixels {int((label > 0).sum())}")

    rows, results, baselines = [], [], {}
    steps = [(name, ablation, sizes, fraction, None) for name, ablation, sizes, fraction in configurations(args.quick)]
    if args.checkpoint and Path(args.checkpoint).is_file():
        steps.append(("HUR-MACL trained demo checkpoint", "checkpoint", "cpu preset", None, Path(args.checkpoint)))
    for name, ablation, sizes, fraction, checkpoint in steps:
        model, optimizer = build(ablation, SIZES[sizes], image.shape[1], checkpoint)
        masks = band_masks(label, fraction) if fraction is not None and fraction < 1.0 else None
        with forced_hard_regions(lambda values: masks[tuple(values.shape[-2:])]) if masks else nullcontext():
            hard = training_step(model, optimizer, image, label)
            if ablation == "unet":
                baselines[sizes] = lambda model=model, optimizer=optimizer: training_step(model, optimizer, image, label)
                seconds = unet_seconds = median_seconds(baselines[sizes], repeats, warmup=0)
                hard = "-"
            else:
                # Alternate with the U-Net of the same sizes, so a drift of the machine affects both.
                seconds, unet_seconds = paired_median_seconds(
                    lambda: training_step(model, optimizer, image, label), baselines[sizes], repeats
                )
        ratio = seconds / unet_seconds
        # The target is for a partly hard image. The 100% rows show how the cost grows with the hard region.
        met = None if ablation == "unet" or fraction == 1.0 else ratio <= 1.5
        if met is not None:
            results.append((name, met))
        hard_region = "band" if masks else f"T = {model.config.threshold:g}"
        rows.append([name, hard_region, hard, seconds, unet_seconds, ratio, "-" if met is None else verdict(met)])
        print(f"{name}: {seconds:.2f} s, {ratio:.2f}x U-Net", flush=True)

    print()
    print_table(["model", "hard region", "hard fraction", "step s", "paired U-Net s", "vs U-Net", "target <= 1.5x"], rows)
    print(f"128 x 128, batch {args.batch}, real OpenKBP slices, forward + loss + backward + SGD, median of {repeats}")
    for name, met in results:
        print(f"RESULT training step, {name}: {verdict(met)} (HUR-MACL at most 1.5x the U-Net step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
