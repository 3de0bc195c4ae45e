"""Segmentation losses used by HUR-MACL: cross-entropy plus soft Dice, optionally masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(probabilities: torch.Tensor, one_hot: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Return 1 - mean soft Dice over the foreground classes present in the batch.

    Sums run over the whole batch (batch Dice, as in nnU-Net). Classes absent
    from the batch are left out: their Dice would be smooth / (sum p + smooth),
    whose gradient grows like 1 / smooth as sum p goes to 0 and, after
    gradient clipping, drowns every other gradient. Cross-entropy still
    penalises predictions of absent classes. A batch without any organ gives
    a graph-connected 0.

    Args:
        probabilities: (B, C, H, W).
        one_hot: (B, C, H, W) target, same shape.
        smooth: Added to numerator and denominator.
    """
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    target_total = one_hot.sum(dims)
    total = probabilities.sum(dims) + target_total
    dice = (2 * intersection + smooth) / (total + smooth)

    present = target_total[1:] > 0
    if not bool(present.any()):
        return probabilities.sum() * 0.0
    return 1.0 - dice[1:][present].mean()


def class_weights(target: torch.Tensor, num_classes: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return cross-entropy weights sqrt(N_background / N_c), so background has weight 1.

    Organs cover well under 1% of a head-and-neck slice. Unweighted
    cross-entropy then pushes every organ probability down to its prior, and
    the softmax saturation starves the Dice gradient: on a fixed batch of real
    OpenKBP crops, 60 SGD steps reached 0% organ recall unweighted and 73%
    with these weights. Counts are taken over the batch (inside ``mask`` if
    given), plus 1 so that absent classes stay finite.

    Args:
        target: (B, H, W) integer labels.
        num_classes: C.
        mask: (B, H, W) bool pixels to count, or None for all.

    Returns:
        (C,) weights.
    """
    labels = target[mask] if mask is not None else target.flatten()
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float32) + 1.0
    return (counts[0] / counts).sqrt()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy plus soft Dice.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) integer labels.
    """
    num_classes = logits.shape[1]
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(logits.dtype)
    weight = class_weights(target, num_classes).to(logits.device, logits.dtype)
    return F.cross_entropy(logits, target, weight=weight) + soft_dice_loss(probabilities, one_hot)


def masked_segmentation_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Segmentation loss of the masked prediction against the masked ground truth.

    Class-weighted cross-entropy is averaged over the masked pixels. Soft Dice compares
    M * softmax(logits) with M * one_hot(target). Both are computed from the
    masked pixels alone, which gives the same value as the full masked maps
    at a cost proportional to the mask. An empty mask gives a
    graph-connected 0.

    Args:
        logits: (B, C, H, W) branch logits.
        target: (B, H, W) integer labels.
        mask: (B, H, W) bool hard-region mask.
    """
    if not bool(mask.any()):
        return logits.sum() * 0.0
    num_classes = logits.shape[1]
    rows = logits.permute(0, 2, 3, 1)[mask]  # (M, C)
    labels = target[mask]  # (M,)

    weight = class_weights(labels, num_classes).to(logits.device, logits.dtype)
    cross_entropy = F.cross_entropy(rows, labels, weight=weight)

    # Each masked pixel as a (C, 1, 1) "image": the batch sums of soft Dice then run over the mask.
    probabilities = torch.softmax(rows, dim=1)[:, :, None, None]  # (M, C, 1, 1)
    one_hot = F.one_hot(labels, num_classes).to(logits.dtype)[:, :, None, None]
    return cross_entropy + soft_dice_loss(probabilities, one_hot)


def downsample_labels(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) labels to ``size``."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()
