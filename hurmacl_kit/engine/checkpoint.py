"""Saving and loading training checkpoints atomically."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from hurmacl_kit.io import atomic_save
from hurmacl_kit.models import HURMACL, HURMACLConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` with ``torch.save`` through a temporary file, so a crash never truncates it."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    atomic_save(path, lambda temporary: torch.save(state, temporary))
    logger.info("saved checkpoint %s (step %s)", path, state.get("step"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a hurmacl-kit checkpoint or is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; train first with `python -m hurmacl_kit train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path} is not a readable hurmacl-kit checkpoint: corrupt, truncated or another kind of file ({error}); "
            "retrain or restore a copy"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise ValueError(f"{path} is not a hurmacl-kit checkpoint (format {CHECKPOINT_FORMAT} with a 'model' entry)")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HURMACL, dict]:
    """Build the model stored in a checkpoint and load its weights.

    Returns:
        The model in eval mode on ``device``, and the whole checkpoint dict.
    """
    state = load_checkpoint(path, map_location=device)
    config = HURMACLConfig.from_dict(state["model_config"])
    model = HURMACL(config).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, state
