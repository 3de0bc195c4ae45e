"""Deformable-CNN branch: convolutions whose sampling positions are learned.

The branch reads the masked probability map M * p (B, C, H, W) and returns
class logits of the same size. Each deformable layer predicts per-pixel
offsets (and, for DCNv2, a modulation mask) with a 3x3 convolution that
starts at zero, so training starts from a plain convolution and learns to
bend its sampling grid toward organ boundaries.

Given a hard-region mask M, the branch keeps its features on the hard
pixels only, in the manner of submanifold sparse convolutions. After the stem
and after every residual layer the features are multiplied by M. A layer
therefore reads zeros wherever the region is easy, and the logits there are
the head's bias. This function can be computed two ways, equal up to float
rounding:

- dense: every layer on the whole (B, F, H, W) map, then the multiplication;
- sparse: every layer at the M hard pixels only (``conv2d_at`` and
  ``deform_conv2d_at`` reading a zero canvas that holds the hard pixels'
  features), so the cost is proportional to the hard fraction.

The sparse path runs when the mask covers less than
``DCNNConfig.sparse_below`` of the pixels. Without a mask every pixel is
hard and the branch is an ordinary dense deformable CNN.

References:
    B. Graham, M. Engelcke, L. van der Maaten, "3D Semantic Segmentation
    with Submanifold Sparse Convolutional Networks", CVPR 2018.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hurmacl_kit.branches.deform import conv2d_at, deform_conv2d, deform_conv2d_at


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
        sparse_below: Compute at the hard pixels only when a mask is given
            and covers less than this share of the pixels; 0 turns the
            sparse path off. Both paths give the same logits up to rounding.
    """

    in_channels: int
    out_channels: int
    hidden_channels: int = 16
    num_layers: int = 2
    modulated: bool = True
    offset_groups: int = 1
    # NOTE: measured on 2 CPU cores only (batch 8, 128 x 128, forward plus backward): the sparse
    # path cost 0.17x the dense one at 10% hard pixels and broke even between 40% and 60%.
    sparse_below: float = 0.5


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
        predictor = self.offset_predictor
        predicted = conv2d_at(x, predictor.weight, predictor.bias, positions, padding=1)  # (M, G * 9 * 3)

        split = 2 * self.offset_groups * self.kernel_size**2
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
            mask: (B, H, W) hard-region mask, or None for every pixel. The
                features are kept on the hard pixels (see the module docstring).

        Returns:
            (B, out_channels, H, W) logits; the head's bias outside the mask.
        """
        # x: (B, C, H, W)
        if self._use_sparse(mask):
            return self._forward_sparse(x, mask)

        keep = None if mask is None else mask.unsqueeze(1).to(x.dtype)  # (B, 1, H, W)
        features = self._masked(self.stem(x), keep)  # (B, F, H, W)
        for layer in self.layers:
            features = self._masked(features + layer(features), keep)
        return self.head(features)  # (B, C_out, H, W)

    @staticmethod
    def _masked(features: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return features if keep is None else features * keep

    def _use_sparse(self, mask: torch.Tensor | None) -> bool:
        if mask is None or self.config.sparse_below <= 0:
            return False
        return float(mask.float().mean()) < self.config.sparse_below

    def _forward_sparse(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W); mask: (B, H, W)
        batch, _, height, width = x.shape
        positions = mask.reshape(-1).nonzero().squeeze(1)  # (M,) flat indices into (B, H, W)
        conv, norm, activation = self.stem
        rows = activation(norm.norm(conv2d_at(x, conv.weight, conv.bias, positions, padding=1)))  # (M, F)

        for deform, norm, activation in self.layers:
            canvas = rows.new_zeros(batch * height * width, rows.shape[1]).index_copy(0, positions, rows)
            canvas = canvas.view(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, F, H, W), channels-last memory
            rows = rows + activation(norm.norm(deform.forward_at(canvas, positions)))

        head_weight = self.head.weight.flatten(1)  # 1x1 convolution as a (C_out, F) matrix
        hard_logits = F.linear(rows, head_weight, self.head.bias)  # (M, C_out)
        logits = self.head.bias.expand(batch * height * width, -1).index_copy(0, positions, hard_logits)
        return logits.view(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W)

    def sampling_offsets(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Return each deformable layer's offsets (B, 2*G*9, H, W) for visualisation, zero outside ``mask``."""
        keep = None if mask is None else mask.unsqueeze(1).to(x.dtype)
        offsets = []
        with torch.no_grad():
            features = self._masked(self.stem(x), keep)
            for layer in self.layers:
                offset, _ = layer[0].offsets_and_mask(features)
                offsets.append(self._masked(offset, keep))
                features = self._masked(features + layer(features), keep)
        return offsets
