"""Hard-region detection from normalised softmax entropy.

For class probabilities p over C classes the normalised entropy is

    U = -sum_c p_c log p_c / log C,

which is 0 for a one-hot vector and 1 for the uniform distribution. HUR-MACL
calls a pixel hard when U > T. The default T = 1e-3 and the sweep
(0.1, 0.05, 0.01, 1e-3, 1e-4) follow the HUR-MACL paper's threshold study.

Only torch is needed.
"""

from __future__ import annotations

import math
import numbers

import torch

DEFAULT_THRESHOLD = 1e-3
THRESHOLD_SWEEP = (0.1, 0.05, 0.01, 1e-3, 1e-4)


def normalized_entropy(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Compute the softmax entropy divided by log C, in [0, 1].

    The term p log p is taken as 0 where p == 0 (its limit), so the result has
    no NaN for probabilities that are exactly 0 or 1.

    Args:
        probabilities: Class probabilities, e.g. (B, C, H, W), summing to 1
            along ``dim``.
        dim: Class dimension.

    Returns:
        Normalised entropy with ``dim`` removed, e.g. (B, H, W).

    Raises:
        ValueError: If there are fewer than 2 classes.
    """
    num_classes = probabilities.shape[dim]
    if num_classes < 2:
        raise ValueError(
            f"normalized_entropy needs at least 2 classes along dim={dim}, got {num_classes}; "
            "pass the softmax output over all classes, background included"
        )

    plogp = torch.special.xlogy(probabilities, probabilities)
    entropy = -plogp.sum(dim=dim)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def entropy_from_logits(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Compute the normalised entropy of ``softmax(logits)``.

    Works in log space (``log_softmax``), which stays exact for very confident
    logits where the softmax rounds to 0 or 1.

    Args:
        logits: Unnormalised scores, e.g. (B, C, H, W).
        dim: Class dimension.

    Returns:
        Normalised entropy with ``dim`` removed, e.g. (B, H, W).
    """
    num_classes = logits.shape[dim]
    if num_classes < 2:
        raise ValueError(f"entropy_from_logits needs at least 2 classes along dim={dim}, got {num_classes}")

    log_probabilities = torch.log_softmax(logits, dim=dim)
    entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=dim)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def hard_region_mask(uncertainty: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Threshold the uncertainty map into the binary hard-region mask M = [U > T].

    Args:
        uncertainty: Normalised entropy, e.g. (B, H, W).
        threshold: T, in (0, 1).

    Returns:
        Boolean mask with the shape of ``uncertainty``.

    Raises:
        ValueError: If ``threshold`` is outside (0, 1).
    """
    validate_threshold(threshold)
    return uncertainty > threshold


def masked_probabilities(probabilities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return M * p, the input of both branches.

    Args:
        probabilities: (B, C, H, W).
        mask: (B, H, W) boolean or {0, 1}.

    Returns:
        (B, C, H, W), zero outside the hard region.
    """
    if mask.shape != probabilities.shape[:1] + probabilities.shape[2:]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match probabilities {tuple(probabilities.shape)}; "
            "expected (B, H, W) for probabilities (B, C, H, W)"
        )
    return probabilities * mask.unsqueeze(1).to(probabilities.dtype)


def hard_fraction(mask: torch.Tensor) -> float:
    """Return the fraction of pixels in the hard region."""
    if mask.numel() == 0:
        return 0.0
    return float(mask.float().mean())


def validate_threshold(threshold: float) -> None:
    """Raise ValueError unless 0 < threshold < 1."""
    is_number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    if not (is_number and 0.0 < float(threshold) < 1.0):
        raise ValueError(
            f"invalid uncertainty threshold T={threshold!r}: normalised entropy lies in [0, 1], "
            f"so T must be in (0, 1); the HUR-MACL default is {DEFAULT_THRESHOLD}"
        )
