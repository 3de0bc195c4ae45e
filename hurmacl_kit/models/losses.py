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


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) integer labels.
    """
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return F.cross_entropy(logits, target) + soft_dice_loss(probabilities, one_hot)


def masked_segmentation_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Segmentation loss of the masked prediction against the masked ground truth.

    Cross-entropy is averaged over the masked pixels. Soft Dice compares
    M * softmax(logits) with M * one_hot(target). An empty mask gives a
    graph-connected 0.

    Args:
        logits: (B, C, H, W) branch logits.
        target: (B, H, W) integer labels.
        mask: (B, H, W) bool hard-region mask.
    """
    if not bool(mask.any()):
        return logits.sum() * 0.0
    weight = mask.unsqueeze(1).to(logits.dtype)  # (B, 1, H, W)

    cross_entropy = F.cross_entropy(logits, target, reduction="none")  # (B, H, W)
    cross_entropy = (cross_entropy * mask).sum() / mask.sum()

    probabilities = torch.softmax(logits, dim=1) * weight
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) * weight
    return cross_entropy + soft_dice_loss(probabilities, one_hot)


def downsample_labels(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) labels to ``size``."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()
