"""Training loop: SGD with Nesterov momentum, polynomial decay, atomic checkpoints and exact resume.

Batch ``step`` is drawn from a generator seeded with (seed, step), and the
augmentation draws depend on (seed, step, slice index) only, so a resumed
run receives exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from hurmacl_kit import data
from hurmacl_kit.engine.checkpoint import load_checkpoint, save_checkpoint
from hurmacl_kit.io import atomic_write_json
from hurmacl_kit.models import HURMACL, HURMACLConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "train_history.json"


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or infinite."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Saved in every checkpoint.

    Attributes:
        data_root: Folder in the nnU-Net raw layout with a ``dataset.json``.
        output_dir: Where the checkpoint and history go.
        ablation: Key of ``hurmacl_kit.models.ABLATIONS``.
        model: Overrides of ``HURMACLConfig`` fields, e.g. {"threshold": 0.01}.
        train_split: Split of ``dataset.json`` to train on.
        steps: Optimiser steps in the whole schedule.
        batch_size: Slices per step.
        optimizer: "sgd" (Nesterov momentum, the HUR-MACL setting) or "adamw".
        learning_rate: Initial learning rate.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 weight decay.
        poly_power: Exponent of the decay lr_t = lr * (1 - t / steps) ** power.
        grad_clip: Maximum gradient norm.
        seed: Seed of weights, batches and augmentation.
        patch_size: Side of the random training crop in pixels, None for whole slices.
        context: Neighbour slices on each side, giving 2 * context + 1 input channels.
        background_fraction: Share of sampling weight on slices without organs.
        checkpoint_every: Steps between checkpoints.
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """

    data_root: str
    output_dir: str
    ablation: str = "hurmacl"
    model: dict = field(default_factory=dict)
    train_split: str = "train"
    steps: int = 1000
    batch_size: int = 8
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    grad_clip: float = 12.0
    seed: int = 42
    patch_size: int | None = 96
    context: int = 1
    background_fraction: float = 0.2
    checkpoint_every: int = 50
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be positive and finite, got {self.learning_rate!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        resolve_device(self.device)

    def model_config(self, num_classes: int) -> HURMACLConfig:
        """Return the ``HURMACLConfig`` of this run."""
        return HURMACLConfig.from_ablation(
            self.ablation, in_channels=2 * self.context + 1, num_classes=num_classes, **self.model
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass
class TrainResult:
    """Outcome of ``train``."""

    model: HURMACL
    history: list[dict]
    checkpoint_path: Path
    completed: bool


def resolve_device(name: str) -> torch.device:
    """Map "auto" to CUDA when available, else CPU.

    Raises:
        ValueError: If ``name`` is CUDA on a machine without it, or is not a device name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device='auto' or 'cpu'")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training_set(config: TrainConfig) -> tuple[data.SliceDataset, data.DatasetInfo]:
    """Load the training cases of ``config.train_split`` into a ``SliceDataset``."""
    info = data.load_dataset_info(config.data_root)
    case_ids = info.splits.get(config.train_split)
    if not case_ids:
        raise ValueError(
            f"split {config.train_split!r} is missing or empty in {info.root / 'dataset.json'}; "
            f"available splits: {sorted(info.splits)}"
        )
    cases = [data.load_dataset_case(info, case_id) for case_id in tqdm(case_ids, desc="load cases", leave=False)]
    dataset = data.SliceDataset(
        cases, context=config.context, patch_size=config.patch_size, augment=True,
        seed=config.seed, background_fraction=config.background_fraction,
    )
    logger.info("training on %d cases, %d slices: %s", len(cases), len(dataset), ", ".join(case_ids))
    return dataset, info


def draw_batch(dataset: data.SliceDataset, step: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Return batch number ``step``: the same for the same (seed, step), however the run was resumed."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    weights = torch.as_tensor(dataset.slice_weights, dtype=torch.float64)
    indices = torch.multinomial(weights, config.batch_size, replacement=True, generator=generator)

    dataset.set_epoch(step)
    samples = [dataset[int(index)] for index in indices]
    return {
        "image": torch.stack([sample["image"] for sample in samples]),  # (B, C, H, W)
        "label": torch.stack([sample["label"] for sample in samples]),  # (B, H, W)
    }


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Return SGD with Nesterov momentum (the HUR-MACL setting) or AdamW."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum,
            nesterov=True, weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def poly_learning_rate(config: TrainConfig, step: int) -> float:
    """Return lr * (1 - step / steps) ** power."""
    return config.learning_rate * (1.0 - step / config.steps) ** config.poly_power


def train(
    config: TrainConfig,
    resume: bool = True,
    stop_after: int | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train HUR-MACL, resuming from ``output_dir/checkpoint.pt`` when it exists.

    Args:
        config: The run.
        resume: Continue from an existing checkpoint of the same run.
        stop_after: Return after this step (checkpointed), as if interrupted.
        callback: Called with each step's record (losses, lr, hard fraction),
            e.g. for live loss curves in a notebook.
        progress: Show a tqdm progress bar.

    Returns:
        A ``TrainResult``.

    Raises:
        NonFiniteLossError: If a loss becomes NaN or infinite.
        ValueError: If the checkpoint belongs to a different configuration.
    """
    # Validate the model settings before loading cases or creating folders.
    config.model_config(num_classes=len(data.load_dataset_info(config.data_root).labels))
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    device = resolve_device(config.device)

    seed_everything(config.seed)
    dataset, info = build_training_set(config)
    model = HURMACL(config.model_config(num_classes=len(info.labels))).to(device)
    optimizer = build_optimizer(model, config)

    start_step, history = 0, []
    if resume and checkpoint_path.exists():
        start_step, history = _restore(checkpoint_path, config, model, optimizer, device)

    last_step = config.steps if stop_after is None else min(config.steps, stop_after)
    logger.info("training %s on %s, steps %d to %d of %d", config.ablation, device, start_step, last_step, config.steps)
    bar = tqdm(range(start_step, last_step), initial=start_step, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        record = _train_step(model, optimizer, dataset, step, config, device, checkpoint_path)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", hard=f"{record['hard_fraction']:.2f}")
        if callback is not None:
            callback(record)

        if (step + 1) % config.checkpoint_every == 0 or step + 1 == last_step:
            _save(checkpoint_path, config, model, optimizer, step + 1, history)
            atomic_write_json(output_dir / HISTORY_NAME, history)

    completed = last_step == config.steps
    logger.info("training %s at step %d of %d", "finished" if completed else "paused", last_step, config.steps)
    return TrainResult(model=model, history=history, checkpoint_path=checkpoint_path, completed=completed)


def _train_step(model, optimizer, dataset, step, config, device, checkpoint_path) -> dict:
    batch = draw_batch(dataset, step, config)
    image, label = batch["image"].to(device), batch["label"].to(device)
    learning_rate = poly_learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate

    model.train()
    losses = model.compute_loss(model(image), label)
    if not torch.isfinite(losses.total):
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: loss1={losses.loss1.item()}, loss2={losses.loss2.item()}, "
            f"loss3={losses.loss3.item()}. Lower learning_rate (now {learning_rate:.2e}) or check the "
            f"input data; the last good checkpoint is {checkpoint_path}"
        )

    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()

    return {
        "step": step + 1,
        "lr": learning_rate,
        "loss": losses.total.item(),
        "loss1": losses.loss1.item(),
        "loss2": losses.loss2.item(),
        "loss3": losses.loss3.item(),
        "hard_fraction": losses.hard_fraction,
    }


def _save(path, config, model, optimizer, step, history) -> None:
    save_checkpoint(
        path,
        {
            "step": step,
            "train_config": config.to_dict(),
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
        },
    )


def _restore(path, config, model, optimizer, device) -> tuple[int, list[dict]]:
    state = load_checkpoint(path, map_location=device)
    saved = state.get("train_config", {})
    differences = {
        key: (saved.get(key), value)
        for key, value in config.to_dict().items()
        if key not in ("output_dir", "device", "checkpoint_every") and saved.get(key) != value
    }
    if differences:
        raise ValueError(
            f"{path} was written by a different run (saved, requested): {differences}. "
            "Use another output folder, or start over with --no-resume (resume=False in Python)"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), list(state.get("history", []))
