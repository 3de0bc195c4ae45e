"""Helpers shared by the teaching notebooks: paths, a cached checkpoint and model outputs on real slices.

Every notebook can run alone. ``find_or_train_checkpoint`` reuses the
checkpoint of ``make demo`` or of an earlier notebook and otherwise trains
the ``quick`` preset once and caches it under ``runs/notebooks``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hurmacl_kit import data
from hurmacl_kit.engine.checkpoint import load_model
from hurmacl_kit.engine.presets import preset
from hurmacl_kit.engine.train import TrainConfig, resolve_device, train
from hurmacl_kit.models import HURMACL, LevelOutput
from hurmacl_kit.models.losses import downsample_labels

logger = logging.getLogger(__name__)

# Searched in this order, relative to the repository root.
CHECKPOINT_CANDIDATES = ("runs/demo/checkpoint.pt", "runs/notebooks/checkpoint.pt")
NOTEBOOK_RUN_DIR = "runs/notebooks"


def find_repo_root(start: str | os.PathLike = ".") -> Path:
    """Return the first folder at or above ``start`` that contains ``pyproject.toml`` and ``hurmacl_kit/``.

    Raises:
        FileNotFoundError: If no such folder exists.
    """
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "hurmacl_kit").is_dir():
            return folder
    raise FileNotFoundError(f"no hurmacl-kit repository (pyproject.toml and hurmacl_kit/) at or above {start}")


def find_or_train_checkpoint(
    root: str | os.PathLike,
    data_root: str | os.PathLike,
    device: str = "auto",
    candidates: tuple[str, ...] = CHECKPOINT_CANDIDATES,
) -> Path:
    """Return an existing checkpoint, or train the ``quick`` preset into ``runs/notebooks``.

    Args:
        root: Repository root; ``candidates`` are relative to it.
        data_root: Dataset to train on when no checkpoint exists.
        device: "auto", "cpu" or "cuda".
        candidates: Checkpoint paths to try, in order.

    Returns:
        Path of the checkpoint.
    """
    root = Path(root)
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            logger.info("using checkpoint %s", path)
            return path

    output_dir = root / NOTEBOOK_RUN_DIR
    logger.info("no checkpoint in %s; training the quick preset into %s", candidates, output_dir)
    config = TrainConfig(data_root=str(data_root), output_dir=str(output_dir), device=device, **preset("quick"))
    return train(config, resume=False, progress=False).checkpoint_path


def load_tutorial_model(checkpoint: str | os.PathLike, device: str = "auto") -> tuple[HURMACL, int]:
    """Load a checkpoint in eval mode and return the model and its slice context."""
    model, state = load_model(checkpoint, device=resolve_device(device))
    return model, int(state["train_config"]["context"])


def organ_slices(label: np.ndarray, count: int) -> list[int]:
    """Return the ``count`` axial slices (last axis) with the most organ voxels, in ascending order."""
    voxels = np.count_nonzero(label, axis=(0, 1))  # (Z,)
    ranked = np.argsort(-voxels, kind="stable")[:count]
    return sorted(int(index) for index in ranked)


@dataclass
class SliceOutputs:
    """A model's outputs on selected axial slices of one case.

    Attributes:
        slice_indices: Axial indices z of the slices, in order.
        images: (S, X, Y) windowed CT of the centre channel, in [0, 1].
        labels: (S, X, Y) ground truth, or None.
        levels: One ``LevelOutput`` per decoder level, tensors on the CPU with batch S.
    """

    slice_indices: list[int]
    images: np.ndarray
    labels: np.ndarray | None
    levels: list[LevelOutput]

    def probabilities(self, level: int) -> torch.Tensor:
        """Return the U-Net softmax (S, C, H_l, W_l) at ``level``."""
        return torch.softmax(self.levels[level].unet_logits, dim=1)

    def level_labels(self, level: int) -> torch.Tensor:
        """Return the ground truth (S, H_l, W_l) downsampled to ``level``, as in training."""
        if self.labels is None:
            raise ValueError("these outputs were computed without a label map")
        target = torch.from_numpy(self.labels).long()
        return downsample_labels(target, self.levels[level].unet_logits.shape[-2:])


@torch.no_grad()
def run_on_slices(model: HURMACL, case: data.Case, slice_indices: list[int], context: int) -> SliceOutputs:
    """Run the full model (U-Net and both branches at every HURM level) on some axial slices.

    Args:
        model: Model in eval mode.
        case: The CT case.
        slice_indices: Axial indices to run.
        context: Neighbour slices on each side, as in training.
    """
    model.eval()
    device = next(model.parameters()).device
    stacked = data.volume_slices(case, context=context)[slice_indices]  # (S, C, X, Y)
    outputs = model(stacked.to(device))

    levels = [_to_cpu(output) for output in outputs]
    labels = None if case.label is None else np.ascontiguousarray(case.label[:, :, slice_indices].transpose(2, 0, 1))
    return SliceOutputs(
        slice_indices=list(slice_indices),
        images=stacked[:, context].numpy(),
        labels=labels,
        levels=levels,
    )


def _to_cpu(output: LevelOutput) -> LevelOutput:
    moved = {
        name: None if value is None else value.detach().cpu()
        for name, value in vars(output).items()
    }
    return LevelOutput(**moved)
