"""Tests of the normalised entropy and the hard-region mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hurmacl_kit.uncertainty import (
    entropy_from_logits,
    hard_fraction,
    hard_region_mask,
    masked_probabilities,
    normalized_entropy,
)


@pytest.mark.parametrize("classes", [2, 3, 8])
def test_entropy_one_hot_is_zero(classes):
    probabilities = torch.zeros(1, classes, 1, 1, dtype=torch.float64)
    probabilities[0, classes - 1] = 1.0

    entropy = normalized_entropy(probabilities)

    assert entropy.shape == (1, 1, 1)
    assert entropy.item() == 0.0


@pytest.mark.parametrize("classes", [2, 3, 8])
def test_entropy_uniform_is_one(classes):
    probabilities = torch.full((1, classes, 2, 2), 1.0 / classes, dtype=torch.float64)

    entropy = normalized_entropy(probabilities)

    torch.testing.assert_close(entropy, torch.ones(1, 2, 2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_entropy_hand_computed():
    # H(0.5, 0.25, 0.25) = 0.5 ln 2 + 2 * 0.25 ln 4 = 0.5 ln 2 + 1.0 ln 2 = 1.5 ln 2 nats,
    # and dividing by ln 3 gives 1.5 ln 2 / ln 3 = 0.946394630357186.
    probabilities = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).view(1, 3, 1, 1)
    expected = 1.5 * math.log(2.0) / math.log(3.0)

    entropy = normalized_entropy(probabilities)

    assert abs(entropy.item() - expected) < 1e-15
    assert abs(expected - 0.946394630357186) < 1e-14


def test_entropy_exact_zeros_no_nan():
    probabilities = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)  # (2, 3)

    entropy = normalized_entropy(probabilities, dim=1)

    assert not torch.isnan(entropy).any()
    assert abs(entropy[0].item() - math.log(2.0) / math.log(3.0)) < 1e-15
    assert entropy[1].item() == 0.0


def test_entropy_other_dim():
    probabilities = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).view(1, 1, 3)

    entropy = normalized_entropy(probabilities, dim=-1)

    assert entropy.shape == (1, 1)
    assert abs(entropy.item() - 1.5 * math.log(2.0) / math.log(3.0)) < 1e-15


def test_logits_entropy_matches_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 3, generator=generator, dtype=torch.float64) * 3

    from_logits = entropy_from_logits(logits)
    from_probabilities = normalized_entropy(torch.softmax(logits, dim=1))

    torch.testing.assert_close(from_logits, from_probabilities, rtol=0, atol=1e-12)


def test_logits_entropy_large_logits_finite():
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4, 0.0]], dtype=torch.float32)  # (2, 3)

    entropy = entropy_from_logits(logits, dim=1)

    assert torch.isfinite(entropy).all()
    assert entropy[0].item() == 0.0
    assert abs(entropy[1].item() - math.log(2.0) / math.log(3.0)) < 1e-6


def test_hard_mask_strictly_greater():
    uncertainty = torch.tensor([[[0.0, 0.001, 0.0010001], [0.5, 1.0, 0.0009]]], dtype=torch.float64)

    mask = hard_region_mask(uncertainty, threshold=0.001)

    expected = torch.tensor([[[False, False, True], [True, True, False]]])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_hard_mask_threshold_equal_value():
    uncertainty = torch.tensor([0.25, 0.5, 0.75])

    mask = hard_region_mask(uncertainty, threshold=0.5)

    assert mask.tolist() == [False, False, True]


def test_masked_probabilities_zero_outside():
    probabilities = torch.softmax(torch.randn(2, 3, 4, 5, dtype=torch.float64), dim=1)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[1, 3, :] = True

    masked = masked_probabilities(probabilities, mask)

    inside = mask.unsqueeze(1).expand_as(probabilities)
    assert torch.equal(masked[inside], probabilities[inside])
    assert (masked[~inside] == 0).all()


def test_masked_probabilities_shape_error():
    probabilities = torch.rand(2, 3, 4, 5)

    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        masked_probabilities(probabilities, torch.ones(2, 4, dtype=torch.bool))


def test_hard_fraction_values():
    mask = torch.tensor([[True, False], [False, False]])

    assert hard_fraction(mask) == 0.25
    assert hard_fraction(torch.zeros(0, dtype=torch.bool)) == 0.0


@pytest.mark.parametrize("threshold", [0, 1, -0.1, 1.5, "a", None])
def test_invalid_threshold_raises(threshold):
    uncertainty = torch.rand(1, 2, 2)

    with pytest.raises(ValueError) as raised:
        hard_region_mask(uncertainty, threshold)

    assert repr(threshold) in str(raised.value)


def test_single_class_raises():
    with pytest.raises(ValueError, match="at least 2 classes"):
        normalized_entropy(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_from_logits(torch.zeros(1, 1, 2, 2))


def test_numpy_float32_threshold_accepted():
    uncertainty = torch.tensor([0.005, 0.02])

    mask = hard_region_mask(uncertainty, np.float32(0.01))

    assert mask.tolist() == [False, True]
