"""Deformable 3x3 convolution, forward plus backward, against a plain conv2d of the same shape.

Shapes are those of the DCNN branch at decoder level 0: batch 8, hidden 8
(CPU preset) or 16 (default) channels, 96 x 96 or 128 x 128. The kernel is
3x3 with padding 1, modulated (DCNv2), one offset group, and offsets of a
few pixels.

Columns:
- conv2d: ``F.conv2d``; the reference cost.
- dense: ``deform_conv2d`` at every pixel. Target: at most 3x conv2d.
- sparse 10%: ``deform_conv2d_at`` at a random 10% of the pixels, the way
  ``DCNNBranch`` runs each layer on a hard region of that size. Random
  pixels are the worst case for memory locality, since a real hard region
  is a band along organ boundaries. Target: at most 3x the dense conv2d.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, median_seconds, print_table, verdict  # noqa: E402

from hurmacl_kit.branches.deform import deform_conv2d, deform_conv2d_at  # noqa: E402


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
    rows, dense_met, sparse_met = [], True, True
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

            times = {
                name: median_seconds(timed_step(function, case, grads if name != "conv2d" else ("x", "weight")), repeats)
                for name, function in (("conv2d", conv), ("dense", dense), ("sparse", sparse))
            }
            dense_ratio, sparse_ratio = times["dense"] / times["conv2d"], times["sparse"] / times["conv2d"]
            dense_met, sparse_met = dense_met and dense_ratio <= 3.0, sparse_met and sparse_ratio <= 3.0
            rows.append(
                [args.batch, channels, size, times["conv2d"] * 1e3, times["dense"] * 1e3, dense_ratio,
                 verdict(dense_ratio <= 3.0), times["sparse"] * 1e3, sparse_ratio, verdict(sparse_ratio <= 3.0)]
            )
            print(f"C={channels} {size}x{size}: dense / conv2d = {dense_ratio:.2f}, sparse / conv2d = {sparse_ratio:.2f}", flush=True)

    print()
    print_table(
        ["B", "C", "H=W", "conv2d ms", "dense ms", "dense / conv2d", "target <= 3x",
         f"sparse {args.sparse_fraction:.0%} ms", "sparse / conv2d", "target <= 3x"],
        rows,
    )
    print(f"3x3, padding 1, modulated, forward + backward of mean(out^2), median of {repeats}")
    print(f"RESULT deform dense: {verdict(dense_met)} (deform_conv2d on every pixel at most 3x conv2d)")
    print(f"RESULT deform sparse: {verdict(sparse_met)} (deform_conv2d_at on {args.sparse_fraction:.0%} of the pixels at most 3x conv2d)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
