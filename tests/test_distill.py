"""Tests of the heterogeneous distillation loss (loss3) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from hurmacl_kit.distill import direction_map, heterogeneous_distillation, kl_per_pixel, masked_mean

LN2, LN3 = math.log(2.0), math.log(3.0)

# KL((3/4, 1/4) || (1/2, 1/2)) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.13081203594113694 nats.
# By symmetry of the numbers, KL((1/4, 3/4) || (1/2, 1/2)) has the same value.
KL_QUARTERS = 0.75 * math.log(1.5) - 0.25 * LN2


def tiny_example():
    """Return a 1 x 2 x 2 x 2 case whose losses are worked out by hand.

    Pixel (row, col), ViM logits, DCNN logits, label, in M:
        (0, 0): (ln 3, 0) -> p = (3/4, 1/4); (0, 0) -> (1/2, 1/2); label 0; hard.
                ce_vim = ln(4/3) < ce_dcnn = ln 2, so ViM teaches.
        (0, 1): (0, 0) -> (1/2, 1/2); (0, ln 3) -> (1/4, 3/4); label 1; hard.
                ce_vim = ln 2 > ce_dcnn = ln(4/3), so DCNN teaches.
        (1, 0): (0, 0); (0, 0); label 0; hard. A tie, so DCNN teaches (KL = 0).
        (1, 1): (0, ln 3); (ln 3, 0); label 0; easy, so neither branch teaches.
    """
    vim = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    dcnn = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    vim[0, 0, 0, 0] = LN3
    dcnn[0, 1, 0, 1] = LN3
    vim[0, 1, 1, 1] = LN3
    dcnn[0, 0, 1, 1] = LN3
    target = torch.tensor([[[0, 1], [0, 0]]])
    hard = torch.tensor([[[True, True], [True, False]]])
    return vim, dcnn, target, hard


def test_cross_entropy_maps():
    vim, dcnn, target, hard = tiny_example()

    result = heterogeneous_distillation(vim, dcnn, target, hard)

    expected_vim = torch.tensor([[[math.log(4 / 3), LN2], [LN2, math.log(4.0)]]], dtype=torch.float64)
    expected_dcnn = torch.tensor([[[LN2, math.log(4 / 3)], [LN2, math.log(4 / 3)]]], dtype=torch.float64)
    torch.testing.assert_close(result.ce_vim, expected_vim, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.ce_dcnn, expected_dcnn, rtol=0, atol=1e-12)


def test_direction_maps_tie_to_dcnn():
    vim, dcnn, target, hard = tiny_example()

    result = heterogeneous_distillation(vim, dcnn, target, hard)

    assert result.vim_teaches.tolist() == [[[True, False], [False, False]]]
    assert result.dcnn_teaches.tolist() == [[[False, True], [True, False]]]


def test_direction_map_function():
    ce_vim = torch.tensor([[[0.1, 0.5, 0.3]]])
    ce_dcnn = torch.tensor([[[0.2, 0.4, 0.3]]])
    hard = torch.tensor([[[True, True, True]]])

    assert direction_map(ce_vim, ce_dcnn, hard).tolist() == [[[True, False, False]]]
    assert direction_map(ce_vim, ce_dcnn, ~hard).tolist() == [[[False, False, False]]]


def test_loss_hand_computed():
    vim, dcnn, target, hard = tiny_example()

    result = heterogeneous_distillation(vim, dcnn, target, hard)

    # ViM teaches at one pixel: KL_QUARTERS / 1. DCNN teaches at two pixels,
    # (0, 1) with KL_QUARTERS and the tie with 0, so the mean is KL_QUARTERS / 2.
    assert abs(result.loss_vim_to_dcnn.item() - KL_QUARTERS) < 1e-12
    assert abs(result.loss_dcnn_to_vim.item() - KL_QUARTERS / 2) < 1e-12
    assert abs(result.loss.item() - 1.5 * KL_QUARTERS) < 1e-12
    assert abs(1.5 * KL_QUARTERS - 0.1962180539117054) < 1e-12


def test_student_gradients_hand_computed():
    vim, dcnn, target, hard = tiny_example()
    vim.requires_grad_(True)
    dcnn.requires_grad_(True)

    heterogeneous_distillation(vim, dcnn, target, hard).loss.backward()

    # d KL(p || softmax(s)) / d s = softmax(s) - p, divided by the pixel count of the direction.
    torch.testing.assert_close(dcnn.grad[0, :, 0, 0], torch.tensor([-0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(vim.grad[0, :, 0, 1], torch.tensor([0.125, -0.125], dtype=torch.float64))


def test_teacher_side_detached():
    vim, dcnn, target, hard = tiny_example()
    vim.requires_grad_(True)
    dcnn.requires_grad_(True)

    result = heterogeneous_distillation(vim, dcnn, target, hard)
    result.loss.backward()

    vim_teaches = result.vim_teaches[0]
    dcnn_teaches = result.dcnn_teaches[0]
    easy = ~hard[0]
    assert (vim.grad[0][:, vim_teaches] == 0).all()
    assert (dcnn.grad[0][:, dcnn_teaches] == 0).all()
    assert (vim.grad[0][:, easy] == 0).all()
    assert (dcnn.grad[0][:, easy] == 0).all()


def reference_loss(vim, dcnn, target, hard):
    """Compute loss3 with explicit per-pixel loops, independent of the library code."""
    terms = {"vim": [], "dcnn": []}
    batch, _, height, width = vim.shape
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                if not hard[b, i, j]:
                    continue
                p_vim = torch.softmax(vim[b, :, i, j], 0)
                p_dcnn = torch.softmax(dcnn[b, :, i, j], 0)
                label = int(target[b, i, j])
                ce_vim = -math.log(p_vim[label])
                ce_dcnn = -math.log(p_dcnn[label])
                if ce_vim < ce_dcnn:
                    terms["vim"].append(float((p_vim * (p_vim / p_dcnn).log()).sum()))
                else:
                    terms["dcnn"].append(float((p_dcnn * (p_dcnn / p_vim).log()).sum()))
    return sum(sum(values) / len(values) for values in terms.values() if values)


def test_loss_matches_loop_reference():
    generator = torch.Generator().manual_seed(3)
    vim = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64) * 2
    dcnn = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (2, 5, 6), generator=generator)
    hard = torch.rand(2, 5, 6, generator=generator) > 0.4

    result = heterogeneous_distillation(vim, dcnn, target, hard)

    assert abs(result.loss.item() - reference_loss(vim, dcnn, target, hard)) < 1e-12


def test_temperature_scales_both():
    vim, dcnn, target, hard = tiny_example()

    result = heterogeneous_distillation(vim, dcnn, target, hard, temperature=2.0)

    # At T = 2 the logits halve: p_vim(0, 0) = (sqrt 3, 1) / (sqrt 3 + 1) against (1/2, 1/2).
    high = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = high * math.log(2 * high) + (1 - high) * math.log(2 * (1 - high))
    assert abs(result.loss_vim_to_dcnn.item() - expected) < 1e-12


def test_empty_mask_zero_loss_and_grad():
    vim, dcnn, target, _ = tiny_example()
    vim.requires_grad_(True)
    dcnn.requires_grad_(True)
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)

    result = heterogeneous_distillation(vim, dcnn, target, empty)
    result.loss.backward()

    assert result.loss.item() == 0.0
    assert vim.grad is not None
    assert dcnn.grad is not None
    assert (vim.grad == 0).all()
    assert (dcnn.grad == 0).all()


def test_one_empty_direction():
    vim, dcnn, target, _ = tiny_example()
    only_vim_pixel = torch.tensor([[[True, False], [False, False]]])

    result = heterogeneous_distillation(vim, dcnn, target, only_vim_pixel)

    assert result.dcnn_teaches.sum().item() == 0
    assert result.loss_dcnn_to_vim.item() == 0.0
    assert abs(result.loss.item() - KL_QUARTERS) < 1e-12


def test_kl_per_pixel_values():
    teacher = torch.tensor([LN3, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    student = torch.zeros(1, 2, 1, 1, dtype=torch.float64)

    kl = kl_per_pixel(teacher, student)

    assert kl.shape == (1, 1, 1)
    assert abs(kl.item() - KL_QUARTERS) < 1e-12
    assert kl_per_pixel(student, student).item() == 0.0


def test_masked_mean_values():
    values = torch.tensor([1.0, 2.0, 6.0])

    assert masked_mean(values, torch.tensor([True, False, True])).item() == 3.5
    assert masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize(
    "vim_shape, dcnn_shape, target_shape, mask_shape",
    [
        ((1, 2, 2, 2), (1, 3, 2, 2), (1, 2, 2), (1, 2, 2)),
        ((1, 2, 2), (1, 2, 2), (1, 2), (1, 2)),
        ((1, 2, 2, 2), (1, 2, 2, 2), (1, 2, 3), (1, 2, 2)),
        ((1, 2, 2, 2), (1, 2, 2, 2), (1, 2, 2), (2, 2, 2)),
    ],
)
def test_shape_errors(vim_shape, dcnn_shape, target_shape, mask_shape):
    with pytest.raises(ValueError):
        heterogeneous_distillation(
            torch.zeros(vim_shape),
            torch.zeros(dcnn_shape),
            torch.zeros(target_shape, dtype=torch.long),
            torch.ones(mask_shape, dtype=torch.bool),
        )


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_errors(temperature):
    vim, dcnn, target, hard = tiny_example()

    with pytest.raises(ValueError, match="temperature"):
        heterogeneous_distillation(vim, dcnn, target, hard, temperature=temperature)
