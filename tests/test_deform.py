"""Tests of the grid_sample deformable convolution against plain convolution and hand-computed samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hurmacl_kit.branches.deform import bilinear_sample, conv2d_at, deform_conv2d, deform_conv2d_at, torchvision_available


def random_case(in_channels, out_channels, groups, offset_groups, height, width, kernel, stride, padding, dilation):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, in_channels, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_channels, in_channels // groups, kernel, kernel, generator=generator, dtype=torch.float64)
    bias = torch.randn(out_channels, generator=generator, dtype=torch.float64)
    out_h = (height + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    offset = torch.zeros(2, 2 * offset_groups * kernel * kernel, out_h, out_w, dtype=torch.float64)
    return image, weight, bias, offset


CONV_CASES = {
    "plain": dict(stride=1, padding=0, dilation=1, groups=1, offset_groups=1),
    "stride2": dict(stride=2, padding=0, dilation=1, groups=1, offset_groups=1),
    "padding1": dict(stride=1, padding=1, dilation=1, groups=1, offset_groups=1),
    "stride2-padding1": dict(stride=2, padding=1, dilation=1, groups=1, offset_groups=1),
    "dilation2": dict(stride=1, padding=1, dilation=2, groups=1, offset_groups=1),
    "groups2": dict(stride=1, padding=1, dilation=1, groups=2, offset_groups=1),
    "offset-groups2": dict(stride=1, padding=1, dilation=1, groups=1, offset_groups=2),
    "all": dict(stride=2, padding=1, dilation=2, groups=2, offset_groups=2),
}


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_zero_offset_equals_conv2d(name, with_mask):
    settings = CONV_CASES[name]
    image, weight, bias, offset = random_case(
        4, 6, settings["groups"], settings["offset_groups"], 9, 11, 3,
        settings["stride"], settings["padding"], settings["dilation"],
    )
    mask = torch.ones(offset.shape[0], offset.shape[1] // 2, *offset.shape[2:], dtype=torch.float64) if with_mask else None

    output = deform_conv2d(
        image, offset, weight, bias, stride=settings["stride"], padding=settings["padding"],
        dilation=settings["dilation"], mask=mask, backend="torch",
    )
    expected = F.conv2d(
        image, weight, bias, stride=settings["stride"], padding=settings["padding"],
        dilation=settings["dilation"], groups=settings["groups"],
    )

    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)


def ramp(height=5, width=5):
    """Return the (1, 1, H, W) image I(y, x) = 1 + x + 10 y."""
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    return (1 + x + 10 * y)[None, None]


def sample_ramp(dy: float, dx: float) -> torch.Tensor:
    """Apply a 1x1 identity kernel whose single tap is shifted by (dy, dx) pixels: (5, 5)."""
    image = ramp()
    offset = torch.empty(1, 2, 5, 5, dtype=torch.float64)
    offset[:, 0] = dy
    offset[:, 1] = dx
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    return deform_conv2d(image, offset, weight, backend="torch")[0, 0]


def test_fractional_offset_interior():
    output = sample_ramp(0.5, 0.25)

    # Bilinear interpolation reproduces a linear ramp exactly where all four corners exist:
    # at (1, 2) the sample point is (1.5, 2.25), so the value is 1 + 2.25 + 15 = 18.25.
    assert output[1, 2].item() == pytest.approx(18.25, abs=1e-12)
    for i in range(4):
        for j in range(4):
            assert output[i, j].item() == pytest.approx(1 + (j + 0.25) + 10 * (i + 0.5), abs=1e-12)


def test_fractional_offset_partly_outside():
    output = sample_ramp(0.5, 0.25)

    # At (4, 4) the point (4.5, 4.25) has corners rows 4, 5 and columns 4, 5. Only
    # (4, 4) is inside, with weight (1 - 0.5) * (1 - 0.25) = 0.375, so 0.375 * 45.
    assert output[4, 4].item() == pytest.approx(0.375 * 45, abs=1e-12)
    # At (4, 1) the point (4.5, 1.25) keeps row 4 only: 0.5 * (1 + 1.25 + 40).
    assert output[4, 1].item() == pytest.approx(0.5 * 42.25, abs=1e-12)
    # At (2, 4) the point (2.5, 4.25) keeps column 4 only: 0.75 * (1 + 4 + 25).
    assert output[2, 4].item() == pytest.approx(0.75 * 30, abs=1e-12)


def test_negative_offset_corner():
    output = sample_ramp(-0.5, -0.25)

    # At (0, 0) the point (-0.5, -0.25) keeps only corner (0, 0), weight 0.5 * 0.75, value 1.
    assert output[0, 0].item() == pytest.approx(0.375, abs=1e-12)
    # At (3, 3) the point (2.5, 2.75) is inside: 1 + 2.75 + 25.
    assert output[3, 3].item() == pytest.approx(28.75, abs=1e-12)


def test_far_outside_is_zero():
    # Row -1 is the edge case: its only inside corner, row 0, has weight 0. The
    # grid_sample coordinate round trip leaves about 1e-16 of it.
    assert sample_ramp(-1.0, 0.0)[0].abs().max().item() < 1e-12
    assert (sample_ramp(0.0, 5.0) == 0).all()
    shifted = sample_ramp(-3.7, 2.2)
    assert (shifted[:3] == 0).all()  # rows i - 3.7 <= -1.7
    assert (shifted[:, 3:] == 0).all()  # columns j + 2.2 >= 5.2
    assert shifted[4, 0].item() == pytest.approx(1 + 2.2 + 10 * 0.3, abs=1e-12)  # (0.3, 2.2) is inside


def test_integer_offset_shifts():
    output = sample_ramp(1.0, 2.0)

    expected = torch.zeros(5, 5, dtype=torch.float64)
    expected[:4, :3] = ramp()[0, 0, 1:, 2:]
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)


def test_bilinear_sample_groups():
    image = torch.cat([ramp(), 2 * ramp()], dim=1)  # (1, 2, 5, 5)
    y = torch.tensor([0.5, 3.0], dtype=torch.float64).view(1, 2, 1)  # group 0 at row 0.5, group 1 at row 3
    x = torch.tensor([1.5, 0.25], dtype=torch.float64).view(1, 2, 1)

    sampled = bilinear_sample(image, y, x, groups=2)

    assert sampled.shape == (1, 2, 1, 1)
    assert sampled[0, 0, 0, 0].item() == pytest.approx(1 + 1.5 + 5, abs=1e-12)
    assert sampled[0, 1, 0, 0].item() == pytest.approx(2 * (1 + 0.25 + 30), abs=1e-12)


def test_mask_scales_linearly():
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(1, 2, 6, 7, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    offset = torch.randn(1, 18, 6, 7, generator=generator, dtype=torch.float64)
    mask = torch.rand(1, 9, 6, 7, generator=generator, dtype=torch.float64)

    once = deform_conv2d(image, offset, weight, bias, padding=1, mask=mask, backend="torch")
    scaled = deform_conv2d(image, offset, weight, bias, padding=1, mask=2.5 * mask, backend="torch")
    zero = deform_conv2d(image, offset, weight, bias, padding=1, mask=torch.zeros_like(mask), backend="torch")

    torch.testing.assert_close(scaled - bias.view(1, 3, 1, 1), 2.5 * (once - bias.view(1, 3, 1, 1)))
    torch.testing.assert_close(zero, bias.view(1, 3, 1, 1).expand_as(zero))


def test_mask_zero_tap_drops_weight():
    image, weight, bias, offset = random_case(2, 3, 1, 1, 6, 6, 3, 1, 1, 1)
    mask = torch.ones(2, 9, 6, 6, dtype=torch.float64)
    mask[:, 4] = 0.0  # tap (1, 1), the centre

    output = deform_conv2d(image, offset, weight, bias, padding=1, mask=mask, backend="torch")
    pruned = weight.clone()
    pruned[:, :, 1, 1] = 0.0

    torch.testing.assert_close(output, F.conv2d(image, pruned, bias, padding=1), rtol=1e-12, atol=1e-12)


def test_gradcheck_tiny():
    generator = torch.Generator().manual_seed(9)
    image = torch.randn(1, 2, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=generator, dtype=torch.float64, requires_grad=True)
    offset = (torch.rand(1, 36, 4, 5, generator=generator, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    mask = torch.rand(1, 18, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(image, offset, weight, bias, mask):
        return deform_conv2d(image, offset, weight, bias, padding=1, mask=mask, backend="torch")

    assert torch.autograd.gradcheck(function, (image, offset, weight, bias, mask))


def test_gradients_reach_offset_and_mask():
    image, weight, bias, offset = random_case(2, 3, 1, 1, 6, 6, 3, 1, 1, 1)
    offset = (offset + 0.3).requires_grad_(True)
    mask = torch.full((2, 9, 6, 6), 0.5, dtype=torch.float64, requires_grad=True)

    deform_conv2d(image, offset, weight, bias, padding=1, mask=mask, backend="torch").square().sum().backward()

    assert offset.grad.abs().sum() > 0
    assert mask.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "offset_shape, mask_shape",
    [
        ((1, 17, 6, 6), None),
        ((1, 18, 5, 6), None),
        ((2, 18, 6, 6), None),
        ((1, 18, 6, 6), (1, 18, 6, 6)),
        ((1, 54, 6, 6), None),  # 3 offset groups do not divide 4 channels
    ],
)
def test_shape_errors(offset_shape, mask_shape):
    image = torch.zeros(1, 4, 6, 6)
    weight = torch.zeros(2, 4, 3, 3)
    mask = None if mask_shape is None else torch.ones(mask_shape)

    with pytest.raises(ValueError):
        deform_conv2d(image, torch.zeros(offset_shape), weight, padding=1, mask=mask)


def test_input_too_small_raises():
    with pytest.raises(ValueError, match="too small"):
        deform_conv2d(torch.zeros(1, 1, 2, 2), torch.zeros(1, 18, 1, 1), torch.zeros(1, 1, 3, 3))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        deform_conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 1, 1), backend="cuda")


@pytest.mark.skipif(torchvision_available(), reason="torchvision imports here, so the error path cannot be reached")
def test_torchvision_backend_missing_raises():
    with pytest.raises(RuntimeError, match="torchvision"):
        deform_conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 1, 1), backend="torchvision")


@pytest.mark.skipif(not torchvision_available(), reason="torchvision.ops does not import beside this torch build")
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_torchvision(with_mask):
    from torchvision.ops import deform_conv2d as reference

    generator = torch.Generator().manual_seed(11)
    image = torch.randn(2, 4, 7, 9, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    offset = torch.randn(2, 36, 4, 5, generator=generator, dtype=torch.float64) * 2
    mask = torch.rand(2, 18, 4, 5, generator=generator, dtype=torch.float64) if with_mask else None

    output = deform_conv2d(image, offset, weight, bias, stride=2, padding=1, dilation=1, mask=mask, backend="torch")
    expected = reference(image, offset, weight, bias, stride=2, padding=1, dilation=1, mask=mask)

    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)


def test_offset_channel_layout():
    # Only tap (0, 2) of input channel 1 has weight, so only offset channels
    # 2 * 9 + 2 * 2 = 22 (rows) and 23 (columns) of offset group 1 matter.
    generator = torch.Generator().manual_seed(12)
    image = torch.randn(1, 2, 6, 6, generator=generator, dtype=torch.float64)
    weight = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    weight[0, 1, 0, 2] = 1.0
    offset = torch.randn(1, 36, 6, 6, generator=generator, dtype=torch.float64)
    offset[:, 22] = 1.0
    offset[:, 23] = 0.0

    output = deform_conv2d(image, offset, weight, padding=1, backend="torch")[0, 0]

    # The tap sits at (i - 1, j + 1) and moves one row down to (i, j + 1).
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[:, :5] = image[0, 1, :, 1:]
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_conv2d_at_equals_conv2d(padding):
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    kernel = 2 * padding + 1
    weight = torch.randn(5, 3, kernel, kernel, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    positions = torch.tensor([0, 6, 41, 42, 50, 83])  # corners and borders of both images
    probe = torch.randn(6, 5, generator=generator, dtype=torch.float64)

    rows = conv2d_at(image, weight, bias, positions, padding=padding)
    dense = F.conv2d(image, weight, bias, padding=padding).permute(0, 2, 3, 1).reshape(-1, 5)[positions]
    rows_grads = torch.autograd.grad((rows * probe).sum(), (image, weight))
    dense_grads = torch.autograd.grad((dense * probe).sum(), (image, weight))

    torch.testing.assert_close(rows, dense, rtol=1e-12, atol=1e-12)
    for got, expected in zip(rows_grads, dense_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_conv2d_at_rejects_kernel_padding_mismatch():
    with pytest.raises(ValueError, match=r"\(3 x 3\) kernel over 2 channels for padding 1"):
        conv2d_at(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 5, 5), None, torch.tensor([0]), padding=1)


def test_integer_offset_gradient_forward_difference():
    # Bilinear sampling has a kink at integer positions, where every tap of a fresh layer samples.
    # Both paths take the forward difference x[y + 1] - x[y] there, as torchvision does.
    image = torch.arange(49, dtype=torch.float64).view(1, 1, 7, 7) ** 2
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 1, 1] = 1.0  # centre tap only
    dense_offset = torch.zeros(1, 18, 7, 7, dtype=torch.float64, requires_grad=True)
    rows_offset = torch.zeros(49, 18, dtype=torch.float64, requires_grad=True)

    deform_conv2d(image, dense_offset, weight, padding=1, backend="torch").sum().backward()
    deform_conv2d_at(image, rows_offset, weight, None, torch.arange(49), (7, 7), padding=1).sum().backward()

    dense_grad = dense_offset.grad.permute(0, 2, 3, 1).reshape(49, 18)
    torch.testing.assert_close(dense_grad, rows_offset.grad, rtol=0, atol=1e-12)
    row_gradient = dense_grad[:, 8].view(7, 7)  # d out / d (row offset) of the centre tap
    assert row_gradient[0, 0].item() == 49.0  # x[1, 0] - x[0, 0] = 49 - 0
    assert row_gradient[6, 0].item() == -1764.0  # the row below the image reads 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: conv2d_at(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), None, torch.tensor([16])),
         r"positions must lie in \[0, 16\)"),
        (lambda: conv2d_at(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), None, torch.tensor([0.0])),
         r"1-D int64 tensor"),
        (lambda: deform_conv2d_at(torch.zeros(1, 1, 4, 4), torch.zeros(1, 18), torch.zeros(1, 1, 3, 3), None,
                                  torch.tensor([0]), (5, 5), padding=1),
         r"output_size \(5, 5\) does not match .* it must be \(4, 4\)"),
        (lambda: deform_conv2d_at(torch.zeros(1, 1, 4, 4), torch.zeros(18), torch.zeros(1, 1, 3, 3), None,
                                  torch.tensor([0]), (4, 4), padding=1),
         r"offset and mask must be 2-D with one row per position \(1\); got offset \(18,\)"),
    ],
)
def test_sparse_call_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
