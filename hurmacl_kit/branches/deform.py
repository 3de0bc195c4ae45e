"""Deformable convolution (DCNv1 and the modulated DCNv2) in pure PyTorch.

``deform_conv2d`` takes the arguments of ``torchvision.ops.deform_conv2d``
(torchvision 0.15 and later) with the same meaning and memory layout:

- ``offset`` is (B, 2 * G * kh * kw, H_out, W_out). For offset group g and
  kernel tap k = i * kw + j, channel g * 2 * kh * kw + 2 * k contains the row
  (y) offset and the next channel the column (x) offset, in pixels.
- ``mask`` is (B, G * kh * kw, H_out, W_out) and scales each sampled value.
- Input channels are split evenly over the G offset groups.

Sampling is bilinear, and a corner outside the image counts as 0, which is
what torchvision's kernels do. ``deform_conv2d`` samples through
``grid_sample``. When torchvision imports and ``backend`` is "auto", its
compiled operator is used instead.

``deform_conv2d_at`` computes the same convolution at chosen output pixels
only, so a caller that needs a sparse set of pixels pays for those alone. It
reads the four corners of each sample with ``index_select`` from a
channels-last copy of the input, weights them once for all channels of an
offset group, and applies the weight with one matrix product. An input that
is already channels-last in memory (``t.permute(0, 3, 1, 2)`` of a
contiguous (B, H, W, C) tensor t) is read without a copy. ``conv2d_at`` is the
plain convolution at chosen pixels: integer taps, one read per tap.

References:
    J. Dai et al., "Deformable Convolutional Networks", ICCV 2017.
    X. Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results",
    CVPR 2019.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply a deformable 2D convolution with torchvision's arguments.

    Args:
        input: (B, C_in, H, W).
        offset: (B, 2 * G * kh * kw, H_out, W_out) sampling offsets in pixels.
        weight: (C_out, C_in / groups, kh, kw). ``groups`` follows from the shapes.
        bias: (C_out,) or None.
        stride: int or (sh, sw).
        padding: int or (ph, pw).
        dilation: int or (dh, dw).
        mask: (B, G * kh * kw, H_out, W_out) modulation, or None for DCNv1.
        backend: "auto" (torchvision when it imports, else PyTorch), "torch"
            or "torchvision".

    Returns:
        (B, C_out, H_out, W_out).

    Raises:
        ValueError: On inconsistent shapes or an unknown backend.
    """
    if backend not in ("auto", "torch", "torchvision"):
        raise ValueError(f"unknown deform_conv2d backend {backend!r}; use 'auto', 'torch' or 'torchvision'")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    geometry = _geometry(input, offset, weight, mask, stride, padding, dilation)

    operator = _torchvision_operator() if backend != "torch" else None
    if backend == "torchvision" and operator is None:
        raise RuntimeError("backend='torchvision' requested but torchvision.ops does not import here")
    if operator is not None:
        return operator(input, offset, weight, bias, stride, padding, dilation, mask)

    # For the dense case grid_sample's fused kernels ran 2-5x faster than the
    # index_select sampler of deform_conv2d_at (forward plus backward, 2 CPU cores).
    columns = _sample_columns(input, offset, mask, geometry, stride, padding, dilation)
    return _apply_weight(columns, weight, bias, geometry)


def deform_conv2d_at(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    positions: torch.Tensor,
    output_size: tuple[int, int],
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply ``deform_conv2d`` at selected output pixels only.

    The cost is proportional to the number of selected pixels. Row i of the
    result equals ``deform_conv2d(...)[b, :, y, x]`` for the pixel
    ``positions[i] = (b * H_out + y) * W_out + x`` when the dense offset and
    mask hold ``offset[i]`` and ``mask[i]`` there.

    Args:
        input: (B, C_in, H, W).
        offset: (M, 2 * G * kh * kw) offsets of the selected pixels, in
            torchvision's channel order.
        weight: (C_out, C_in / groups, kh, kw).
        bias: (C_out,) or None.
        positions: (M,) int64 flat indices into (B, H_out, W_out).
        output_size: (H_out, W_out) of the dense output the positions index.
        stride: int or (sh, sw).
        padding: int or (ph, pw).
        dilation: int or (dh, dw).
        mask: (M, G * kh * kw) modulation, or None.

    Returns:
        (M, C_out).

    Raises:
        ValueError: On inconsistent shapes, an ``output_size`` that does not
            follow from the input and kernel, or positions out of range.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if input.dim() != 4:
        raise ValueError(f"input must be (B, C_in, H, W), got shape {tuple(input.shape)}")
    expected = _output_size(input.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    if tuple(output_size) != expected:
        raise ValueError(f"output_size {tuple(output_size)} does not match this input and kernel; it must be {expected}")
    count = _check_positions(positions, input.shape[0] * expected[0] * expected[1])
    if offset.dim() != 2 or offset.shape[0] != count or (mask is not None and (mask.dim() != 2 or mask.shape[0] != count)):
        raise ValueError(
            f"offset and mask must be 2-D with one row per position ({count}); got offset {tuple(offset.shape)}, "
            f"mask {None if mask is None else tuple(mask.shape)}"
        )
    dense_offset = offset.new_empty(input.shape[0], offset.shape[1], *expected)
    dense_mask = None if mask is None else mask.new_empty(input.shape[0], mask.shape[1], *expected)
    geometry = _geometry(input, dense_offset, weight, dense_mask, stride, padding, dilation)
    return _deform_rows(input, offset, weight, bias, positions, mask, geometry, stride, padding, dilation)


def conv2d_at(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    positions: torch.Tensor,
    padding: int = 1,
) -> torch.Tensor:
    """Apply a stride-1 ``F.conv2d`` with 'same' output size at selected pixels only.

    Args:
        input: (B, C_in, H, W).
        weight: (C_out, C_in, kh, kw) with kh = kw = 2 * padding + 1.
        bias: (C_out,) or None.
        positions: (M,) int64 flat indices ``(b * H + y) * W + x``.
        padding: Zero padding on each side.

    Returns:
        (M, C_out), row i equal to ``F.conv2d(input, weight, bias, padding=padding)[b, :, y, x]``.

    Raises:
        ValueError: If the kernel is not (2 * padding + 1) square, the channels
            differ, or positions are out of range.
    """
    if input.dim() != 4:
        raise ValueError(f"input must be (B, C_in, H, W), got shape {tuple(input.shape)}")
    batch, channels, height, width = input.shape
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if kernel_h != kernel_w or kernel_h != 2 * padding + 1 or in_channels != channels:
        raise ValueError(
            f"conv2d_at needs a ({2 * padding + 1} x {2 * padding + 1}) kernel over {channels} channels "
            f"for padding {padding}; got weight {tuple(weight.shape)}"
        )
    count = _check_positions(positions, batch * height * width)

    # Tap (i, j) of pixel (y, x) reads (y + i - padding, x + j - padding); taps outside the image read 0.
    shifts = torch.arange(kernel_h, device=input.device) - padding
    row = ((positions // width) % height)[:, None] + shifts.repeat_interleave(kernel_w)  # (M, taps)
    col = (positions % width)[:, None] + shifts.repeat(kernel_h)
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    pixel = (positions // (height * width))[:, None] * (height * width) + row.clamp(0, height - 1) * width
    pixel = pixel + col.clamp(0, width - 1)

    rows = input.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # free for channels-last input
    columns = rows.index_select(0, pixel.flatten()).view(count, kernel_h * kernel_w, channels)  # (M, taps, C_in)
    columns = columns * inside[..., None].to(columns.dtype)
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)  # (C_out, taps * C_in), tap-major
    return F.linear(columns.reshape(count, kernel.shape[1]), kernel, bias)


def _output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )


def _check_positions(positions: torch.Tensor, total: int) -> int:
    """Return M for (M,) int64 flat indices in [0, total), or raise ValueError naming the bad value."""
    if positions.dim() != 1 or positions.dtype != torch.int64:
        raise ValueError(f"positions must be a 1-D int64 tensor, got {positions.dtype} of shape {tuple(positions.shape)}")
    if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < total):
        raise ValueError(
            f"positions must lie in [0, {total}) = [0, B * H_out * W_out); got values from "
            f"{int(positions.min())} to {int(positions.max())}"
        )
    return positions.shape[0]


def _deform_rows(input, offset, weight, bias, positions, mask, geometry, stride, padding, dilation) -> torch.Tensor:
    """Deformable convolution at flat output positions: (M,) -> (M, C_out)."""
    columns = _sample_rows(input, offset, mask, positions, geometry, stride, padding, dilation)  # (M, taps, C_in)
    groups, out_channels = geometry["groups"], geometry["out_channels"]
    taps = geometry["kernel"][0] * geometry["kernel"][1]
    count, width = columns.shape[0], taps * geometry["in_channels"] // groups

    # weight (C_out, C_in / groups, kh, kw) -> (groups, taps * C_in / groups, C_out), matching the column order.
    kernel = weight.reshape(groups, out_channels // groups, -1, taps).permute(0, 3, 2, 1)
    kernel = kernel.reshape(groups, -1, out_channels // groups)
    if groups == 1:
        output = columns.reshape(count, width) @ kernel[0]
    else:
        grouped = columns.view(count, taps, groups, geometry["in_channels"] // groups).transpose(0, 2)  # (groups, taps, M, C_in / groups)
        grouped = grouped.permute(0, 2, 1, 3).reshape(groups, count, width)  # (groups, M, taps * C_in / groups)
        output = torch.bmm(grouped, kernel).transpose(0, 1).reshape(count, out_channels)
    if bias is not None:
        output = output + bias
    return output  # (M, C_out)


def _sample_rows(input, offset, mask, positions, geometry, stride, padding, dilation) -> torch.Tensor:
    """Sample the input at every deformed tap of the given output pixels: (M, taps, C_in).

    The four bilinear corners and their weights are computed once per
    (pixel, tap, offset group) and shared by the group's channels. The input
    is read as rows of a channels-last (B * H * W * G, C_in / G) matrix, so
    each corner is one ``index_select`` of whole rows. A corner outside the
    image gets weight 0, and its index is clamped to a valid row.
    """
    batch, in_channels = geometry["batch"], geometry["in_channels"]
    height, width = geometry["height"], geometry["width"]
    kernel_h, kernel_w = geometry["kernel"]
    out_h, out_w = geometry["out"]
    groups = geometry["offset_groups"]
    taps = kernel_h * kernel_w
    count = positions.shape[0]

    # Regular grid position of every tap of every selected pixel, in input pixels.
    sample = positions // (out_h * out_w)  # (M,)
    row = (positions // out_w) % out_h
    col = positions % out_w
    tap_rows = (torch.arange(kernel_h, device=input.device) * dilation[0]).repeat_interleave(kernel_w)
    tap_cols = (torch.arange(kernel_w, device=input.device) * dilation[1]).repeat(kernel_h)
    base_y = (row * stride[0] - padding[0])[:, None] + tap_rows  # (M, taps)
    base_x = (col * stride[1] - padding[1])[:, None] + tap_cols

    offset = offset.view(count, groups, taps, 2).transpose(1, 2)  # (M, taps, G, 2)
    y = base_y.to(offset.dtype)[..., None] + offset[..., 0]  # (M, taps, G)
    x = base_x.to(offset.dtype)[..., None] + offset[..., 1]
    y0, x0 = torch.floor(y), torch.floor(x)
    dy, dx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    modulation = None if mask is None else mask.view(count, groups, taps).transpose(1, 2)  # (M, taps, G)

    rows = input.permute(0, 2, 3, 1).reshape(batch * height * width * groups, in_channels // groups)  # channels-last rows
    group_index = torch.arange(groups, device=input.device)
    corner_y = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)  # (M, taps, G, 4)
    corner_x = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    weight = torch.stack([(1 - dy) * (1 - dx), (1 - dy) * dx, dy * (1 - dx), dy * dx], dim=-1)
    inside = (corner_y >= 0) & (corner_y < height) & (corner_x >= 0) & (corner_x < width)
    weight = weight * inside
    if modulation is not None:
        weight = weight * modulation[..., None]

    # One read gathers all four corners, and one (1 x 4) @ (4 x C/G) product per sample point mixes them.
    pixel = corner_y.clamp(0, height - 1) * width + corner_x.clamp(0, width - 1)
    index = (sample[:, None, None, None] * (height * width) + pixel) * groups + group_index[:, None]
    values = rows.index_select(0, index.flatten()).view(-1, 4, in_channels // groups)  # (M * taps * G, 4, C/G)
    sampled = torch.bmm(weight.reshape(-1, 1, 4), values)  # (M * taps * G, 1, C/G)
    return sampled.reshape(count, taps, in_channels)


def _geometry(input, offset, weight, mask, stride, padding, dilation) -> dict:
    if input.dim() != 4:
        raise ValueError(f"input must be (B, C_in, H, W), got shape {tuple(input.shape)}")
    batch, in_channels, height, width = input.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    if group_channels == 0 or in_channels % group_channels:
        raise ValueError(f"weight {tuple(weight.shape)} does not divide the {in_channels} input channels into groups")
    groups = in_channels // group_channels
    taps = kernel_h * kernel_w

    out_h, out_w = _output_size((height, width), (kernel_h, kernel_w), stride, padding, dilation)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"input {height}x{width} is too small for kernel {kernel_h}x{kernel_w} with this padding")

    if offset.dim() != 4 or offset.shape[0] != batch or offset.shape[2:] != (out_h, out_w) or offset.shape[1] % (2 * taps):
        raise ValueError(
            f"offset must be ({batch}, 2 * offset_groups * {taps}, {out_h}, {out_w}), got {tuple(offset.shape)}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups:
        raise ValueError(f"{offset_groups} offset groups do not divide the {in_channels} input channels")
    if mask is not None and mask.shape != (batch, offset_groups * taps, out_h, out_w):
        raise ValueError(
            f"mask must be ({batch}, {offset_groups * taps}, {out_h}, {out_w}) to match offset, got {tuple(mask.shape)}"
        )
    return dict(
        batch=batch, in_channels=in_channels, height=height, width=width, out_channels=out_channels,
        groups=groups, kernel=(kernel_h, kernel_w), out=(out_h, out_w), offset_groups=offset_groups,
    )


def _sample_columns(input, offset, mask, geometry, stride, padding, dilation) -> torch.Tensor:
    """Sample the input at every deformed tap: (B, C_in * kh * kw, H_out * W_out)."""
    batch, in_channels = geometry["batch"], geometry["in_channels"]
    height, width = geometry["height"], geometry["width"]
    kernel_h, kernel_w = geometry["kernel"]
    out_h, out_w = geometry["out"]
    offset_groups = geometry["offset_groups"]
    taps = kernel_h * kernel_w

    # Regular grid positions of every tap, (taps, out_h, out_w), in input pixels.
    rows = torch.arange(out_h, device=input.device, dtype=input.dtype) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=input.device, dtype=input.dtype) * stride[1] - padding[1]
    tap_rows = (torch.arange(kernel_h, device=input.device, dtype=input.dtype) * dilation[0]).repeat_interleave(kernel_w)
    tap_cols = (torch.arange(kernel_w, device=input.device, dtype=input.dtype) * dilation[1]).repeat(kernel_h)
    base_y = tap_rows[:, None, None] + rows[None, :, None]  # (taps, out_h, 1)
    base_x = tap_cols[:, None, None] + cols[None, None, :]  # (taps, 1, out_w)

    offset = offset.view(batch, offset_groups, taps, 2, out_h, out_w)
    y = base_y + offset[:, :, :, 0]  # (B, G, taps, out_h, out_w)
    x = base_x + offset[:, :, :, 1]
    sampled = bilinear_sample(input, y, x, offset_groups)  # (B, G, C_in / G, taps, out_h, out_w)

    if mask is not None:
        sampled = sampled * mask.view(batch, offset_groups, 1, taps, out_h, out_w)
    return sampled.reshape(batch, in_channels * taps, out_h * out_w)


def bilinear_sample(input: torch.Tensor, y: torch.Tensor, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sample ``input`` bilinearly at pixel coordinates, zero outside the image.

    Args:
        input: (B, C, H, W).
        y: (B, G, *S) row coordinates in pixels (0 is the first row's centre).
        x: (B, G, *S) column coordinates, same shape.
        groups: G. Channel c is sampled at the coordinates of group c // (C / G).

    Returns:
        (B, G, C / G, *S).
    """
    batch, channels, height, width = input.shape
    sample_shape = y.shape[2:]

    # grid_sample with align_corners=False maps pixel p to (2p + 1) / size - 1.
    # With power-of-two sizes this map and its inverse are exact for integer p,
    # so the zero padding below keeps an integer coordinate (every tap of a fresh
    # layer) from rounding to just below itself. Its floor, and so the one-sided
    # offset gradient, then match deform_conv2d_at and torchvision. The padding
    # reads as zeros, like the outside of the image.
    padded_h, padded_w = 1 << (height - 1).bit_length(), 1 << (width - 1).bit_length()
    padded = F.pad(input, (0, padded_w - width, 0, padded_h - height))
    grid_x = (2.0 * x + 1.0) / padded_w - 1.0
    grid_y = (2.0 * y + 1.0) / padded_h - 1.0
    grid = torch.stack([grid_x, grid_y], dim=-1).reshape(batch * groups, -1, 1, 2)  # (B*G, S, 1, 2)

    grouped = padded.reshape(batch * groups, channels // groups, padded_h, padded_w)
    sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.reshape(batch, groups, channels // groups, *sample_shape)


def _apply_weight(columns, weight, bias, geometry) -> torch.Tensor:
    batch, groups = geometry["batch"], geometry["groups"]
    out_h, out_w = geometry["out"]
    out_channels = geometry["out_channels"]

    # Columns are ordered channel-major, tap-minor, like weight.view(C_out, -1).
    columns = columns.view(batch, groups, -1, out_h * out_w)  # (B, groups, C_in/groups * taps, L)
    kernel = weight.reshape(groups, out_channels // groups, -1)  # (groups, C_out/groups, C_in/groups * taps)
    output = torch.einsum("goi,bgil->bgol", kernel, columns).reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        output = output + bias.view(1, -1, 1, 1)
    return output


@functools.lru_cache(maxsize=1)
def _torchvision_operator():
    try:
        from torchvision.ops import deform_conv2d as operator
    except Exception:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        return None
    return operator


def torchvision_available() -> bool:
    """Return True when ``torchvision.ops.deform_conv2d`` imports here."""
    return _torchvision_operator() is not None
