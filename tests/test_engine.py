"""Tests of training, resume, prediction, evaluation and the CLI on the bundled OpenKBP sample.

Training runs use the 4 cases of the ``validation`` split, 64 x 64 crops and
a learning rate of 1e-2 so that a few dozen CPU steps show the loss falling.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hurmacl_kit.cli import main
from hurmacl_kit.engine.checkpoint import load_checkpoint
from hurmacl_kit.engine.evaluate import PER_CASE_NAME, SUMMARY_NAME, evaluate
from hurmacl_kit.engine.predict import predict_file
from hurmacl_kit.engine.presets import preset
from hurmacl_kit.engine.train import CHECKPOINT_NAME, HISTORY_NAME, NonFiniteLossError, TrainConfig, train
from hurmacl_kit.models import HURMACL, LossOutput

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = REPOSITORY_ROOT / "sample_data" / "openkbp"
ORGANS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"]

# A model small enough for resume and failure tests, where only equality matters.
TINY_MODEL = dict(
    features=(4, 8, 16, 32, 64), hurm_levels=(0,), vim_d_model=8, vim_depth=1,
    vim_patch_size=8, vim_d_state=4, dcnn_hidden=4, dcnn_layers=1,
)


def quick_config(output_dir, ablation="unet", **overrides) -> TrainConfig:
    values = preset("quick")
    values.update(batch_size=4, patch_size=64, learning_rate=1e-2, device="cpu")
    values.update(overrides)
    return TrainConfig(
        data_root=str(SAMPLE_ROOT), output_dir=str(output_dir), ablation=ablation, train_split="validation", **values
    )


def tiny_config(output_dir, **overrides) -> TrainConfig:
    values = dict(steps=6, batch_size=2, patch_size=32, checkpoint_every=2, model=dict(TINY_MODEL))
    values.update(overrides)
    return quick_config(output_dir, ablation="hurmacl", **values)


def mean(values) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """Train a narrow U-Net ablation for 30 steps once; later tests reuse its checkpoint."""
    model = dict(features=(8, 16, 32, 64, 128))
    config = quick_config(tmp_path_factory.mktemp("unet_run"), steps=30, checkpoint_every=10, model=model)
    return config, train(config, resume=False, progress=False)


@pytest.mark.slow
def test_unet_loss_decreases(unet_run):
    config, result = unet_run
    losses = [record["loss"] for record in result.history]

    assert result.completed
    assert len(losses) == 30
    assert [record["step"] for record in result.history] == list(range(1, 31))
    assert all(np.isfinite(losses))
    assert mean(losses[-5:]) < 0.9 * mean(losses[:5])
    assert all(record["loss2"] == 0.0 and record["loss3"] == 0.0 for record in result.history)


def test_history_file_matches(unet_run):
    config, result = unet_run

    saved = json.loads((Path(config.output_dir) / HISTORY_NAME).read_text())
    state = load_checkpoint(result.checkpoint_path)

    assert saved == result.history
    assert state["step"] == 30
    assert state["history"] == result.history
    assert state["train_config"] == config.to_dict()


def test_poly_learning_rate_recorded(unet_run):
    config, result = unet_run

    rates = [record["lr"] for record in result.history]

    assert rates[0] == pytest.approx(1e-2)
    assert rates[15] == pytest.approx(1e-2 * (1 - 15 / 30) ** 0.9)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))


@pytest.mark.slow
def test_hurmacl_loss_decreases(tmp_path):
    model = dict(preset("quick")["model"], features=(8, 16, 32, 64, 128), hurm_levels=(0, 1))
    config = quick_config(tmp_path, ablation="hurmacl", steps=12, checkpoint_every=12, model=model)

    result = train(config, resume=False, progress=False)

    losses = [record["loss"] for record in result.history]
    assert all(np.isfinite(losses))
    assert mean(losses[-5:]) < mean(losses[:5])
    assert all(record["loss2"] > 0.0 for record in result.history)
    assert all(record["loss3"] > 0.0 for record in result.history)
    assert all(0.0 < record["hard_fraction"] <= 1.0 for record in result.history)


def test_resume_equivalence(tmp_path):
    straight = train(tiny_config(tmp_path / "straight"), resume=False, progress=False)
    first_half = train(tiny_config(tmp_path / "resumed"), resume=False, stop_after=3, progress=False)
    second_half = train(tiny_config(tmp_path / "resumed"), resume=True, progress=False)

    assert not first_half.completed
    assert len(first_half.history) == 3
    assert second_half.completed
    assert second_half.history == straight.history
    straight_state = straight.model.state_dict()
    for name, value in second_half.model.state_dict().items():
        assert torch.equal(value, straight_state[name]), name


def test_resume_different_config_raises(tmp_path):
    train(tiny_config(tmp_path, steps=2), resume=False, progress=False)

    with pytest.raises(ValueError, match="different run"):
        train(tiny_config(tmp_path, steps=2, learning_rate=5e-3), resume=True, progress=False)


def test_resume_truncated_checkpoint_raises(tmp_path):
    train(tiny_config(tmp_path, steps=2), resume=False, progress=False)
    checkpoint = tmp_path / CHECKPOINT_NAME
    content = checkpoint.read_bytes()
    checkpoint.write_bytes(content[: len(content) // 2])

    with pytest.raises(ValueError, match="corrupt, truncated or another kind of file"):
        load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="corrupt, truncated or another kind of file"):
        train(tiny_config(tmp_path, steps=2), resume=True, progress=False)


def test_non_finite_loss_raises(tmp_path, monkeypatch):
    original = HURMACL.compute_loss

    def poisoned(self, outputs, target):
        losses = original(self, outputs, target)
        return LossOutput(losses.total * float("nan"), losses.loss1, losses.loss2, losses.loss3, losses.hard_fraction)

    monkeypatch.setattr(HURMACL, "compute_loss", poisoned)

    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        train(tiny_config(tmp_path, steps=2), resume=False, progress=False)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_predict_file_outputs(unet_run, tmp_path):
    _, result = unet_run
    image_path = SAMPLE_ROOT / "imagesTr" / "pt_247_0000.nii.gz"
    labels_path, uncertainty_path = tmp_path / "labels.nii.gz", tmp_path / "uncertainty.nii.gz"

    prediction = predict_file(result.checkpoint_path, image_path, labels_path, uncertainty_path, device="cpu")

    reference = nib.load(str(image_path))
    labels = nib.load(str(labels_path))
    uncertainty = nib.load(str(uncertainty_path))
    assert labels.shape == reference.shape
    assert uncertainty.shape == reference.shape
    assert np.array_equal(labels.affine, reference.affine)
    assert np.array_equal(uncertainty.affine, reference.affine)
    label_values = np.asarray(labels.dataobj)
    uncertainty_values = np.asarray(uncertainty.dataobj)
    assert label_values.min() >= 0
    assert label_values.max() <= 7
    assert uncertainty_values.min() >= 0.0
    assert uncertainty_values.max() <= 1.0
    assert np.array_equal(label_values, prediction.labels)
    assert 0.0 <= prediction.hard_fraction <= 1.0


def test_predict_missing_image_raises(unet_run, tmp_path):
    _, result = unet_run

    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        predict_file(result.checkpoint_path, tmp_path / "missing.nii.gz", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")


def test_evaluate_writes_metrics(unet_run, tmp_path):
    _, result = unet_run

    summary = evaluate(result.checkpoint_path, SAMPLE_ROOT, tmp_path, case_ids=["pt_247"], device="cpu")

    written = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert written == json.loads(json.dumps(summary))
    assert list(written["organs"]) == ORGANS
    assert written["case_ids"] == ["pt_247"]
    assert written["step"] == 30
    with open(tmp_path / PER_CASE_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["organ"] for row in rows] == ORGANS
    assert {row["case_id"] for row in rows} == {"pt_247"}
    assert (tmp_path / "predictions" / "pt_247_labels.nii.gz").is_file()
    assert (tmp_path / "predictions" / "pt_247_uncertainty.nii.gz").is_file()


def test_cli_help_lists_commands():
    completed = subprocess.run(
        [sys.executable, "-m", "hurmacl_kit", "--help"], capture_output=True, text=True, timeout=120, cwd=REPOSITORY_ROOT
    )

    assert completed.returncode == 0
    for command in ("train", "evaluate", "predict"):
        assert command in completed.stdout


@pytest.mark.parametrize("command, option", [("train", "--preset"), ("evaluate", "--split"), ("predict", "--labels-out")])
def test_cli_command_help(command, option, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])

    assert exited.value.code == 0
    assert option in capsys.readouterr().out


def test_cli_missing_data_exits_2(tmp_path):
    missing = tmp_path / "no_such_dataset"

    completed = subprocess.run(
        [sys.executable, "-m", "hurmacl_kit", "train", "--data", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=REPOSITORY_ROOT,
    )

    assert completed.returncode == 2
    assert str(missing) in completed.stderr
    assert "not found" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_garbage_checkpoint_raises(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello\n")

    with pytest.raises(ValueError, match="garbage.pt is not a readable hurmacl-kit checkpoint"):
        load_checkpoint(garbage)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_raises():
    from hurmacl_kit.engine.train import resolve_device

    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize(
    "context, batch_size, message",
    [(0, None, r"context=0 gives 2 \* context \+ 1 input slices, but the model takes 3; use .* 1"),
     (1, 0, "batch_size must be an integer of at least 1 slice, got 0"),
     (1, 2.5, "got 2.5"),
     (1, True, "got True")],
)
def test_predict_case_bad_arguments(context, batch_size, message):
    from hurmacl_kit import data
    from hurmacl_kit.engine.predict import predict_case
    from hurmacl_kit.models import HURMACLConfig

    model = HURMACL(HURMACLConfig.from_ablation("unet", in_channels=3, features=(4, 8, 16, 32, 64)))
    case = data.Case("synthetic", np.zeros((16, 16, 2), np.float32), None, (1.0, 1.0, 1.0), np.eye(4))

    with pytest.raises(ValueError, match=message):
        predict_case(model, case, context=context, batch_size=batch_size)


def test_unwritable_output_names_destination(tmp_path):
    from hurmacl_kit.io import atomic_write_json

    blocker = tmp_path / "a_file"
    blocker.write_text("")

    with pytest.raises(OSError, match=r"cannot write .*a_file/out.json: .*; choose a writable folder"):
        atomic_write_json(blocker / "out.json", {})
