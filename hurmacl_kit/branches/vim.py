"""Vision Mamba (ViM) branch: a bidirectional selective-scan encoder over image patches.

The branch reads the masked probability map M * p (B, C, H, W):

1. pad H and W up to a multiple of the patch size P and cut P x P patches;
2. embed each patch linearly and add a learned 2D position embedding,
   resized bilinearly to the patch grid, so any H and W work;
3. run ``depth`` bidirectional Mamba blocks over the patch sequence;
4. project each token back to P x P x C logits and crop to H x W.

A bidirectional block normalises its input and projects it to x and z. Each
direction, with its own parameters, runs a causal depthwise convolution and a
selective scan: forwards over x, backwards over the flipped sequence. Both
outputs are gated by SiLU(z) and summed, then projected back and added to
the residual.

With ``skip_easy_tokens`` a patch with no hard pixel is dropped from the
sequence, so the scan costs in proportion to the hard-region size. The kept
patches of each sample are packed to the front of a padded batch; the
forward scan is causal and the backward scan reverses only each sample's
kept prefix, so padding never reaches a kept token.

References:
    L. Zhu et al., "Vision Mamba: Efficient Visual Representation Learning
    with Bidirectional State Space Model", ICML 2024, arXiv:2401.09417.
    A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
    State Spaces", 2023, arXiv:2312.00752.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hurmacl_kit.branches.scan import selective_scan


@dataclass
class ViMConfig:
    """Size of the ViM branch.

    Attributes:
        in_channels: Channels of the branch input (the number of classes).
        out_channels: Output logits (the number of classes).
        patch_size: Side P of the square patches.
        d_model: Token width.
        depth: Number of bidirectional Mamba blocks.
        d_state: State size N of the selective scan.
        expand: Inner width of a block is ``expand * d_model``.
        d_conv: Kernel size of the causal depthwise convolution.
        dt_rank: Rank of the step-size projection, ``ceil(d_model / 16)`` if None.
        position_grid: Side of the learned position-embedding grid.
        skip_easy_tokens: Drop patches without hard pixels from the sequence.
    """

    in_channels: int
    out_channels: int
    patch_size: int = 4
    d_model: int = 32
    depth: int = 2
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None
    position_grid: int = 32
    skip_easy_tokens: bool = True


class SelectiveScanDirection(nn.Module):
    """Parameters and computation of one scan direction of a Mamba block."""

    def __init__(self, inner: int, d_state: int, d_conv: int, dt_rank: int):
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank

        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)

        # S4D-real initialisation A_n = -(n + 1) and step sizes log-uniform in [1e-3, 1e-1].
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        step = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(step + torch.log(-torch.expm1(-step)))  # inverse softplus

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # x, z: (B, E, L)
        length = x.shape[-1]
        x = F.silu(self.conv(x)[..., :length])  # causal: keep the first L outputs

        projected = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = projected.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj.weight @ dt.transpose(1, 2)  # (B, E, L)

        return selective_scan(
            x,
            delta,
            -torch.exp(self.A_log),
            B.transpose(1, 2).contiguous(),  # (B, N, L)
            C.transpose(1, 2).contiguous(),
            self.D,
            z=z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
        )  # (B, E, L)


class BidirectionalMambaBlock(nn.Module):
    """Pre-norm residual block with a forward and a backward selective scan."""

    def __init__(self, config: ViMConfig):
        super().__init__()
        inner = config.expand * config.d_model
        dt_rank = config.dt_rank or math.ceil(config.d_model / 16)

        self.norm = nn.LayerNorm(config.d_model)
        self.in_proj = nn.Linear(config.d_model, 2 * inner, bias=False)
        self.forward_scan = SelectiveScanDirection(inner, config.d_state, config.d_conv, dt_rank)
        self.backward_scan = SelectiveScanDirection(inner, config.d_state, config.d_conv, dt_rank)
        self.out_proj = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Mix the tokens along the sequence in both directions.

        Args:
            tokens: (B, L, D).
            lengths: (B,) number of valid leading tokens per sample, or None
                when all L are valid. The tokens after them are padding: the
                backward scan reverses only the valid prefix, so padding
                changes no valid token's output.

        Returns:
            (B, L, D).
        """
        # tokens: (B, L, D)
        x, z = self.in_proj(self.norm(tokens)).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each

        forward_out = self.forward_scan(x, z)  # (B, E, L)
        if lengths is None:
            backward_out = self.backward_scan(x.flip(-1), z.flip(-1)).flip(-1)  # back to forward order
        else:
            reverse = _reverse_prefix_index(lengths, x.shape[-1]).unsqueeze(1).expand_as(x)  # (B, E, L)
            backward_out = self.backward_scan(x.gather(-1, reverse), z.gather(-1, reverse))
            backward_out = backward_out.gather(-1, reverse)  # the permutation is its own inverse

        mixed = (forward_out + backward_out).transpose(1, 2)  # (B, L, E)
        return tokens + self.out_proj(mixed)


def _reverse_prefix_index(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Return (B, L) indices that reverse the first lengths[b] positions of each row and keep the rest."""
    position = torch.arange(length, device=lengths.device).expand(lengths.shape[0], length)
    return torch.where(position < lengths[:, None], lengths[:, None] - 1 - position, position)


class ViMBranch(nn.Module):
    """Vision Mamba encoder over the masked probability map, mapped back to image size."""

    def __init__(self, config: ViMConfig):
        super().__init__()
        self.config = config
        patch_dim = config.patch_size**2 * config.in_channels

        self.embed = nn.Linear(patch_dim, config.d_model)
        self.position = nn.Parameter(torch.zeros(1, config.d_model, config.position_grid, config.position_grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(BidirectionalMambaBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.patch_size**2 * config.out_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict logits from the masked map.

        Args:
            x: (B, C, H, W) masked probabilities M * p.
            mask: (B, H, W) hard-region mask, used to skip patches without
                hard pixels when ``skip_easy_tokens`` is set.

        Returns:
            (B, out_channels, H, W) logits, meaningful inside the hard region.
        """
        # x: (B, C, H, W)
        height, width = x.shape[-2:]
        patch = self.config.patch_size
        pad_h, pad_w = (-height) % patch, (-width) % patch
        x = F.pad(x, (0, pad_w, 0, pad_h))
        grid_h, grid_w = x.shape[-2] // patch, x.shape[-1] // patch

        tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
        tokens = self.embed(tokens) + self._position_embedding(grid_h, grid_w)  # (B, L, D)

        keep = self._tokens_to_keep(mask, pad_h, pad_w, grid_h, grid_w)
        tokens = self._encode(tokens, keep)  # (B, L, D)

        patches = self.head(self.norm(tokens))  # (B, L, P*P*C_out)
        logits = rearrange(
            patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid_h, w=grid_w, p1=patch, p2=patch
        )
        return logits[..., :height, :width]

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        position = self.position
        if position.shape[-2:] != (grid_h, grid_w):
            position = F.interpolate(position, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return rearrange(position, "1 d h w -> 1 (h w) d")

    def _tokens_to_keep(self, mask, pad_h, pad_w, grid_h, grid_w) -> torch.Tensor | None:
        """Return (B, L) bool, True for patches with at least one hard pixel, or None to keep all."""
        if mask is None or not self.config.skip_easy_tokens:
            return None
        padded = F.pad(mask.float().unsqueeze(1), (0, pad_w, 0, pad_h))
        keep = F.max_pool2d(padded, self.config.patch_size).flatten(1) > 0  # (B, L)
        return None if bool(keep.all()) else keep

    def _encode(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # tokens: (B, L, D); keep: (B, L) or None
        if keep is None:
            for block in self.blocks:
                tokens = block(tokens)
            return tokens

        # Pack each sample's kept tokens, in order, to the front of a padded batch.
        lengths = keep.sum(1)  # (B,)
        packed_length = int(lengths.max())
        encoded = torch.zeros_like(tokens)
        if packed_length == 0:
            return encoded
        order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :packed_length]
        sequence = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, L_kept_max, D)
        for block in self.blocks:
            sequence = block(sequence, lengths)

        sample, slot = (torch.arange(packed_length, device=tokens.device) < lengths[:, None]).nonzero(as_tuple=True)
        return encoded.index_put((sample, order[sample, slot]), sequence[sample, slot])
