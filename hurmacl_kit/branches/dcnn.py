"""Deformable-CNN branch: convolutions whose sampling positions are learned.

The branch reads the masked probability map M * p (B, C, H, W) and returns
class logits of the same size. Each deformable layer predicts per-pixel
offsets (and, for DCNv2, a modulation mask) with a 3x3 convolution that
starts at zero, so training starts from a plain convolution and learns to
bend its sampling grid toward organ boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hurmacl_kit.branches.deform import deform_conv2d


@dataclass
class DCNNConfig:
    """Size of the deformable-CNN branch.

    Attributes:
        in_channels: Channels of the branch input (the number of classes).
        out_channels: Output logits (the number of classes).
        hidden_channels: Width of the hidden layers.
        num_layers: Deformable 3x3 layers after the plain 3x3 stem.
        modulated: Use DCNv2 modulation masks.
        offset_groups: Offset groups of each deformable layer.
    """

    in_channels: int
    out_channels: int
    hidden_channels: int = 16
    num_layers: int = 2
    modulated: bool = True
    offset_groups: int = 1


class DeformConv2d(nn.Module):
    """3x3 deformable convolution with its own offset (and mask) predictor."""

    def __init__(self, in_channels: int, out_channels: int, modulated: bool = True, offset_groups: int = 1):
        super().__init__()
        self.kernel_size = 3
        self.modulated = modulated
        self.offset_groups = offset_groups
        taps = self.kernel_size**2

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

        predicted = offset_groups * taps * (3 if modulated else 2)
        self.offset_predictor = nn.Conv2d(in_channels, predicted, 3, padding=1)
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    def offsets_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict offsets (B, 2*G*9, H, W) and the modulation mask (B, G*9, H, W) or None."""
        predicted = self.offset_predictor(x)
        split = 2 * self.offset_groups * self.kernel_size**2
        offset = predicted[:, :split]
        # 2 * sigmoid lies in (0, 2) and equals 1 at initialisation, so a fresh layer is a plain convolution.
        mask = 2.0 * torch.sigmoid(predicted[:, split:]) if self.modulated else None
        return offset, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W)
        offset, mask = self.offsets_and_mask(x)
        return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each pixel, so a pixel's output depends only on its own features."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DCNNBranch(nn.Module):
    """Deformable CNN over the masked probability map."""

    def __init__(self, config: DCNNConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_channels

        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, hidden, 3, padding=1), ChannelLayerNorm(hidden), nn.GELU()
        )
        self.layers = nn.ModuleList(
            nn.Sequential(
                DeformConv2d(hidden, hidden, config.modulated, config.offset_groups),
                ChannelLayerNorm(hidden),
                nn.GELU(),
            )
            for _ in range(config.num_layers)
        )
        self.head = nn.Conv2d(hidden, config.out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict logits from the masked map.

        Args:
            x: (B, C, H, W) masked probabilities M * p.
            mask: (B, H, W) hard-region mask. Unused by the dense computation,
                accepted for the same call signature as ``ViMBranch``.

        Returns:
            (B, out_channels, H, W) logits, meaningful inside the hard region.
        """
        # x: (B, C, H, W)
        features = self.stem(x)  # (B, F, H, W)
        for layer in self.layers:
            features = features + layer(features)
        return self.head(features)  # (B, C_out, H, W)

    def sampling_offsets(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return each deformable layer's offsets (B, 2*G*9, H, W), for visualisation."""
        offsets = []
        with torch.no_grad():
            features = self.stem(x)
            for layer in self.layers:
                offset, _ = layer[0].offsets_and_mask(features)
                offsets.append(offset)
                features = features + layer(features)
        return offsets
