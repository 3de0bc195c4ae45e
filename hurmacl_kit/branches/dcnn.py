"""Deformable-CNN branch: convolutions whose sampling positions are learned.

The branch reads the masked probability map M * p (B, C, H, W) and returns
class logits of the same size. Each deformable layer predicts per-pixel
offsets (and, for DCNv2, a modulation mask) with a 3x3 convolution that
starts at zero, so training starts from a plain convolution and learns to
bend its sampling grid toward organ boundaries.

With a hard-region mask covering less than ``DCNNConfig.sparse_below`` of
the pixels, the last deformable layer and the head run at the hard pixels
only (``deform_conv2d_at``). The stem and the earlier layers stay dense,
because a deformable layer may sample its input anywhere. At hard pixels the
result equals the dense computation up to float rounding. Outside them the
sparse path returns the head applied to the features before the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import torch.nn.functional as F

from hurmacl_kit.branches.deform import deform_conv2d, deform_conv2d_at


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
        sparse_below: Run the last layer at the hard pixels only when a mask
            is given and covers less than this share of the pixels; 0 turns
            the sparse path off.
    """

    in_channels: int
    out_channels: int
    hidden_channels: int = 16
    num_layers: int = 2
    modulated: bool = True
    offset_groups: int = 1
    # NOTE: the break-even share was about 0.15-0.2 in benchmarks/bench_deform.py
    # (2 shared CPU cores, noisy); re-measure on other hardware.
    sparse_below: float = 0.15


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

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Compute ``forward(x)`` at flat pixel indices into (B, H, W) only.

        Args:
            x: (B, C_in, H, W).
            positions: (M,) int64 indices ``(b * H + y) * W + x``.

        Returns:
            (M, C_out), row i equal to ``forward(x)[b, :, y, x]`` for position i.
        """
        # x: (B, C_in, H, W)
        size = tuple(x.shape[-2:])
        taps = self.kernel_size**2
        # The offset predictor is a plain 3x3 convolution: a deformable one with zero offsets.
        zero_offset = x.new_zeros(positions.shape[0], 2 * taps)
        predictor = self.offset_predictor
        predicted = deform_conv2d_at(x, zero_offset, predictor.weight, predictor.bias, positions, size, padding=1)

        split = 2 * self.offset_groups * taps
        offset = predicted[:, :split]
        mask = 2.0 * torch.sigmoid(predicted[:, split:]) if self.modulated else None
        return deform_conv2d_at(x, offset, self.weight, self.bias, positions, size, padding=1, mask=mask)


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
            mask: (B, H, W) hard-region mask, or None. A mask covering less
                than ``config.sparse_below`` of the pixels selects the sparse
                path (see the module docstring).

        Returns:
            (B, out_channels, H, W) logits, meaningful inside the hard region.
        """
        # x: (B, C, H, W)
        features = self.stem(x)  # (B, F, H, W)
        if not self._use_sparse(mask):
            for layer in self.layers:
                features = features + layer(features)
            return self.head(features)  # (B, C_out, H, W)

        for layer in self.layers[:-1]:
            features = features + layer(features)
        return self._last_layer_at_hard_pixels(features, mask)

    def _use_sparse(self, mask: torch.Tensor | None) -> bool:
        if mask is None or not self.layers or self.config.sparse_below <= 0:
            return False
        return float(mask.float().mean()) < self.config.sparse_below

    def _last_layer_at_hard_pixels(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # features: (B, F, H, W); mask: (B, H, W)
        batch, _, height, width = features.shape
        deform, norm, activation = self.layers[-1]
        positions = mask.reshape(-1).nonzero().squeeze(1)  # (M,)

        rows = features.permute(0, 2, 3, 1).reshape(batch * height * width, -1)  # (B*H*W, F)
        update = activation(norm.norm(deform.forward_at(features, positions)))  # (M, F)
        hard_rows = rows.index_select(0, positions) + update

        head_weight = self.head.weight.flatten(1)  # 1x1 convolution as a (C_out, F) matrix
        logits = F.linear(rows, head_weight, self.head.bias)  # (B*H*W, C_out)
        logits = logits.index_copy(0, positions, F.linear(hard_rows, head_weight, self.head.bias))
        return logits.view(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W)

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
