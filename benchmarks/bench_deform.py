"""Deformable 3x3 convolution, forward plus backward, against a plain conv2d of the same shape.

Shapes are those of the DCNN branch at decoder level 0: batch 8, hidden 8
(CPU preset) or 16 (default) channels, 96 x 96 or 128 x 128. The kernel is
3x3 with padding 1, modulated (DCNv2), one offset group, and offsets of a
few pixels.

Columns:
- conv2d: ``F.conv2d``; the reference cost.
- dense: ``deform_conv2d`` at every pixel. Target: at most 3x conv2d.
- sparse 10%: ``deform_conv2d_at`` at a random 10% of the pixels, the way
  ``DCNNBranch`` runs it on a hard region of that size.
- grid_sample: the same dense convolution built on ``bilinear_sample``
  (``F.grid_sample``), the kit's previous implementation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, median_seconds, print_table, verdict  # noqa: E402

from hurmacl_kit.branches.deform import bilinear_sample, deform_conv2d, deform_conv2d_at  # noqa: E402


def grid_sample_deform(x, offset, weight, bias, mask):
    """Dense 3x3 deformable convolution (padding 1, one offset group) through ``bilinear_sample``."""
    batch, channels, height, width = x.shape
    rows = torch.arange(height, dtype=x.dtype) - 1
    cols = torch.arange(width, dtype=x.dtype) - 1
    tap_rows = torch.arange(3, dtype=x.dtype).repeat_interleave(3)
    tap_cols = torch.arange(3, dtype=x.dtype).repeat(3)
    offset = offset.view(batch, 1, 9, 2, height, width)
    y = tap_rows[:, None, None] + rows[None, :, None] + offset[:, :, :, 0]
    x_coord = tap_cols[:, None, None] + cols[None, None, :] + offset[:, :, :, 1]
    sampled = bilinear_sample(x, y, x_coord, 1) * mask.view(batch, 1, 1, 9, height, width)
    columns = sampled.reshape(batch, channels * 9, height * width)
    output = weight.view(weight.shape[0], -1) @ columns + bias[:, None]
    return output.view(batch, -1, height, width)


def make_case(batch: int, channels: int, size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, channels, size, size, generator=generator),
        offset=torch.randn(batch, 18, size, size, generator=generator) * 2.0,
        mask=torch.rand(batch, 9, size, size, generator=generator) * 2.0,
        weight=torch.randn(channels, channels, 3, 3, generator=generator) * 0.1,
        bias=torch.zeros(channels),
    )


def timed_step(function, case: dict, names: tuple[str, ...]):
    def step():
        leaves = {key: value.detach().requires_grad_(key in names) for key, value in case.items()}
        function(leaves).square().mean().backward()
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 96 x 96 only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, quick 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparse-fraction", type=float, default=0.1, help="share of pixels for the sparse column")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    sizes = (96,) if args.quick else (96, 128)

    print(machine_info())
    rows, met = [], True
    for channels in (8, 16):
        for size in sizes:
            case = make_case(args.batch, channels, size)
            pixels = args.batch * size * size
            positions = torch.randperm(pixels, generator=torch.Generator().manual_seed(2))[: int(pixels * args.sparse_fraction)]
            positions = positions.sort().values
            grads = ("x", "offset", "mask", "weight")

            def conv(leaves):
                return F.conv2d(leaves["x"], leaves["weight"], leaves["bias"], padding=1)

            def dense(leaves):
                return deform_conv2d(
                    leaves["x"], leaves["offset"], leaves["weight"], leaves["bias"], padding=1, mask=leaves["mask"], backend="torch"
                )

            def sparse(leaves):
                offset = leaves["offset"].permute(0, 2, 3, 1).reshape(pixels, 18)[positions]
                mask = leaves["mask"].permute(0, 2, 3, 1).reshape(pixels, 9)[positions]
                return deform_conv2d_at(
                    leaves["x"], offset, leaves["weight"], leaves["bias"], positions, (size, size), padding=1, mask=mask
                )

            def grid(leaves):
                return grid_sample_deform(leaves["x"], leaves["offset"], leaves["weight"], leaves["bias"], leaves["mask"])

            with torch.no_grad():
                difference = float((dense(case) - grid(case)).abs().max())
            times = {
                name: median_seconds(timed_step(function, case, grads if name != "conv2d" else ("x", "weight")), repeats)
                for name, function in (("conv2d", conv), ("dense", dense), ("sparse", sparse), ("grid_sample", grid))
            }
            ratio = times["dense"] / times["conv2d"]
            met = met and ratio <= 3.0
            rows.append(
                [args.batch, channels, size, times["conv2d"] * 1e3, times["dense"] * 1e3, ratio, verdict(ratio <= 3.0),
                 times["sparse"] * 1e3, times["sparse"] / times["conv2d"], times["grid_sample"] * 1e3,
                 times["grid_sample"] / times["conv2d"], difference]
            )
            print(f"C={channels} {size}x{size}: dense / conv2d = {ratio:.2f}", flush=True)

    print()
    print_table(
        ["B", "C", "H=W", "conv2d ms", "dense ms", "dense / conv2d", "target <= 3x",
         f"sparse {args.sparse_fraction:.0%} ms", "sparse / conv2d", "grid_sample ms", "grid_sample / conv2d", "max |dense - grid_sample|"],
        rows,
    )
    print(f"3x3, padding 1, modulated, forward + backward of mean(out^2), median of {repeats}")
    print(f"RESULT deform dense: {verdict(met)} (deform_conv2d at most 3x conv2d)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
