"""Parameters and forward FLOPs of the U-Net, HUR-MACL and each branch at 128 x 128.

FLOPs are counted for one forward pass of one 128 x 128 slice (3 input
slices, 8 classes) with ``torch.utils.flop_counter.FlopCounterMode``, which
counts matrix products and convolutions (a multiply-add is 2 FLOPs) but no
elementwise work. Two elementwise parts matter here and are added
analytically:

- the selective scan: about 7 FLOPs per (token, channel, state) and scan
  direction (exp(delta A) 2, the drive delta u B 2, the state update 2 and
  half of <C, h> amortised, rounded up to 7);
- bilinear sampling in the deformable layers: per (pixel, tap) about 10 FLOPs
  for the corner weights, plus 8 FLOPs per channel (4 products, 3 sums and
  the modulation).

Branches are counted on every pixel (100% hard), their largest cost. With
a hard fraction f, the ViM tokens and the DCNN layers (sparse below 50% hard) scale with f.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table  # noqa: E402

from hurmacl_kit.engine.presets import CPU_BRANCHES  # noqa: E402
from hurmacl_kit.models import HURMACL, HURMACLConfig  # noqa: E402

SIZES = {"default": {}, "cpu preset": CPU_BRANCHES}
SIDE = 128
CLASSES = 8


def count_flops(module: torch.nn.Module, *inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


def parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def scan_flops(vim, side: int) -> int:
    config = vim.config
    tokens = (-(-side // config.patch_size)) ** 2
    return 7 * tokens * config.expand * config.d_model * config.d_state * 2 * config.depth


def sampling_flops(dcnn, side: int) -> int:
    config = dcnn.config
    return config.num_layers * side * side * 9 * (10 + 8 * config.hidden_channels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same as the full run (it takes seconds)")
    parser.parse_args()
    print(machine_info())

    image = torch.rand(1, 3, SIDE, SIDE)
    rows = []
    unet_model = HURMACL(HURMACLConfig.from_ablation("unet", in_channels=3, num_classes=CLASSES))
    unet_flops = count_flops(unet_model.unet, image)
    rows.append(["U-Net", "-", parameters(unet_model), unet_flops / 1e9, 0.0, unet_flops / 1e9])

    for sizes, overrides in SIZES.items():
        model = HURMACL(HURMACLConfig(in_channels=3, num_classes=CLASSES, **overrides))
        counted = count_flops(model, image)
        analytic = 0
        for level in model.config.hurm_levels:
            side = SIDE >> level
            analytic += scan_flops(model.vim[str(level)], side) + sampling_flops(model.dcnn[str(level)], side)
        rows.append([f"HUR-MACL (training forward, 4 levels)", sizes, parameters(model), counted / 1e9, analytic / 1e9,
                     (counted + analytic) / 1e9])

        probabilities = torch.softmax(torch.randn(1, CLASSES, SIDE, SIDE), dim=1)
        for name, branch, extra in (
            ("ViM branch, level 0", model.vim["0"], scan_flops(model.vim["0"], SIDE)),
            ("DCNN branch, level 0", model.dcnn["0"], sampling_flops(model.dcnn["0"], SIDE)),
        ):
            counted = count_flops(branch, probabilities)
            rows.append([name, sizes, parameters(branch), counted / 1e9, extra / 1e9, (counted + extra) / 1e9])

    print()
    print_table(["module", "sizes", "parameters", "counted GFLOPs", "analytic GFLOPs", "total GFLOPs"], rows)
    print(f"one {SIDE} x {SIDE} slice, forward, branches on 100% hard pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
