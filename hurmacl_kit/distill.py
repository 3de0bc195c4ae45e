"""Heterogeneous feature distillation between the ViM and DCNN branches (loss3).

Inside the hard region M, each pixel is taught by the branch that predicts it
better. With per-pixel cross-entropies ce_vim and ce_dcnn against the ground
truth, the direction map is

    m = M & (ce_vim < ce_dcnn)      (ViM teaches DCNN where m is 1)
    n = M & ~(ce_vim < ce_dcnn)     (DCNN teaches ViM elsewhere in M; ties go here)

and

    loss3 = mean_{m} KL(p_vim || p_dcnn) + mean_{n} KL(p_dcnn || p_vim),

where the teacher distribution is detached, so gradients reach the student
only. Each direction is averaged over its own pixels, and an empty set
contributes 0 while keeping the graph connected.

Only torch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillationOutput:
    """Result of ``heterogeneous_distillation``.

    Attributes:
        loss: Scalar loss3 (sum of both directions).
        vim_teaches: (B, H, W) bool, pixels where ViM is the teacher.
        dcnn_teaches: (B, H, W) bool, pixels where DCNN is the teacher.
        ce_vim: (B, H, W) per-pixel cross-entropy of the ViM branch.
        ce_dcnn: (B, H, W) per-pixel cross-entropy of the DCNN branch.
        loss_vim_to_dcnn: Scalar, KL term where ViM teaches.
        loss_dcnn_to_vim: Scalar, KL term where DCNN teaches.
    """

    loss: torch.Tensor
    vim_teaches: torch.Tensor
    dcnn_teaches: torch.Tensor
    ce_vim: torch.Tensor
    ce_dcnn: torch.Tensor
    loss_vim_to_dcnn: torch.Tensor
    loss_dcnn_to_vim: torch.Tensor


def direction_map(ce_vim: torch.Tensor, ce_dcnn: torch.Tensor, hard_mask: torch.Tensor) -> torch.Tensor:
    """Return m, 1 where ViM is more reliable (lower cross-entropy) inside the hard region.

    Args:
        ce_vim: (B, H, W) per-pixel cross-entropy of the ViM branch.
        ce_dcnn: (B, H, W) per-pixel cross-entropy of the DCNN branch.
        hard_mask: (B, H, W) bool hard-region mask M.

    Returns:
        (B, H, W) bool. Ties go to DCNN, so m is 0 there.
    """
    return hard_mask.bool() & (ce_vim < ce_dcnn)


def kl_per_pixel(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Compute KL(p_teacher || p_student) at every pixel, teacher detached.

    Args:
        teacher_logits: (B, C, H, W).
        student_logits: (B, C, H, W).
        temperature: Softmax temperature for both distributions.

    Returns:
        (B, H, W) KL divergence in nats.
    """
    teacher_log = torch.log_softmax(teacher_logits.detach() / temperature, dim=1)
    student_log = torch.log_softmax(student_logits / temperature, dim=1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(dim=1)


def heterogeneous_distillation(
    vim_logits: torch.Tensor,
    dcnn_logits: torch.Tensor,
    target: torch.Tensor,
    hard_mask: torch.Tensor,
    temperature: float = 1.0,
) -> DistillationOutput:
    """Compute loss3 and the maps behind it.

    Args:
        vim_logits: (B, C, H, W) ViM branch logits.
        dcnn_logits: (B, C, H, W) DCNN branch logits.
        target: (B, H, W) integer labels in [0, C).
        hard_mask: (B, H, W) bool hard-region mask M.
        temperature: Softmax temperature of the KL terms (1 in HUR-MACL).

    Returns:
        A ``DistillationOutput``.

    Raises:
        ValueError: On mismatched shapes or a non-positive temperature.
    """
    _check_inputs(vim_logits, dcnn_logits, target, hard_mask, temperature)
    hard_mask = hard_mask.bool()

    with torch.no_grad():
        ce_vim = F.cross_entropy(vim_logits, target, reduction="none")
        ce_dcnn = F.cross_entropy(dcnn_logits, target, reduction="none")
        vim_teaches = direction_map(ce_vim, ce_dcnn, hard_mask)
        dcnn_teaches = hard_mask & ~vim_teaches

    # The KL terms are computed at the hard pixels only, as (M, C, 1, 1) columns.
    vim_rows = vim_logits.permute(0, 2, 3, 1)[hard_mask][:, :, None, None]
    dcnn_rows = dcnn_logits.permute(0, 2, 3, 1)[hard_mask][:, :, None, None]
    kl_to_dcnn = kl_per_pixel(vim_rows, dcnn_rows, temperature).flatten()  # ViM teaches DCNN, (M,)
    kl_to_vim = kl_per_pixel(dcnn_rows, vim_rows, temperature).flatten()  # DCNN teaches ViM
    loss_vim_to_dcnn = masked_mean(kl_to_dcnn, vim_teaches[hard_mask])
    loss_dcnn_to_vim = masked_mean(kl_to_vim, dcnn_teaches[hard_mask])

    return DistillationOutput(
        loss=loss_vim_to_dcnn + loss_dcnn_to_vim,
        vim_teaches=vim_teaches,
        dcnn_teaches=dcnn_teaches,
        ce_vim=ce_vim,
        ce_dcnn=ce_dcnn,
        loss_vim_to_dcnn=loss_vim_to_dcnn,
        loss_dcnn_to_vim=loss_dcnn_to_vim,
    )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ``values`` over ``mask``; an empty mask gives a graph-connected 0."""
    count = mask.sum()
    if count == 0:
        return values.sum() * 0.0
    return (values * mask).sum() / count


def _check_inputs(vim_logits, dcnn_logits, target, hard_mask, temperature) -> None:
    if vim_logits.shape != dcnn_logits.shape or vim_logits.dim() != 4:
        raise ValueError(
            f"branch logits must both be (B, C, H, W); got {tuple(vim_logits.shape)} and {tuple(dcnn_logits.shape)}"
        )
    spatial = vim_logits.shape[:1] + vim_logits.shape[2:]
    if target.shape != spatial or hard_mask.shape != spatial:
        raise ValueError(
            f"target {tuple(target.shape)} and hard_mask {tuple(hard_mask.shape)} must be (B, H, W) = {tuple(spatial)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
