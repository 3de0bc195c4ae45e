"""2D U-Net backbone with a 1x1 classification head at every decoder level.

Each stage is two 3x3 convolutions with instance normalisation and leaky
ReLU, in the style of nnU-Net. The decoder upsamples bilinearly to the exact
size of the skip connection, so odd input sizes such as 127 x 129 work.

References:
    O. Ronneberger et al., "U-Net: Convolutional Networks for Biomedical
    Image Segmentation", MICCAI 2015.
    F. Isensee et al., "nnU-Net: a self-configuring method for deep
    learning-based biomedical image segmentation", Nature Methods 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Two (conv 3x3, instance norm, leaky ReLU) layers."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm2d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.InstanceNorm2d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet2D(nn.Module):
    """U-Net whose ``len(features) - 1`` decoder levels each end in a 1x1 head.

    Args:
        in_channels: Input channels (slices of context).
        num_classes: Output classes, background included.
        features: Channels of the encoder stages, finest first. Five stages
            give four decoder levels.
    """

    def __init__(self, in_channels: int, num_classes: int, features: tuple[int, ...] = (16, 32, 64, 128, 256)):
        super().__init__()
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 stages, got {features}")
        self.num_levels = len(features) - 1

        self.encoder = nn.ModuleList()
        previous = in_channels
        for channels in features:
            self.encoder.append(ConvBlock(previous, channels))
            previous = channels

        self.reduce = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            self.reduce.append(nn.Conv2d(features[level + 1], features[level], 1))
            self.decoder.append(ConvBlock(2 * features[level], features[level]))
            self.heads.append(nn.Conv2d(features[level], num_classes, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the logits of every decoder level, finest first.

        Args:
            x: (B, C_in, H, W).

        Returns:
            ``num_levels`` tensors; level l is (B, num_classes, H_l, W_l) with
            H_l = floor(H / 2^l) after the pooling chain.
        """
        # x: (B, C_in, H, W)
        minimum = 2 ** (len(self.encoder) - 1) * 2
        if min(x.shape[-2:]) < minimum:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} is too small for {len(self.encoder)} stages: each side must be at "
                f"least {minimum} pixels so that instance norm sees more than one pixel at the bottleneck"
            )
        skips = []
        for index, stage in enumerate(self.encoder):
            if index > 0:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)

        logits = []
        x = skips[-1]
        for step, level in enumerate(reversed(range(self.num_levels))):
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.decoder[step](torch.cat([self.reduce[step](x), skip], dim=1))
            logits.append(self.heads[step](x))

        return logits[::-1]
