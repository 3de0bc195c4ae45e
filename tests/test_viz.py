"""Figures and widgets of hurmacl_kit.viz, driven without a front end."""

import ast
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from hurmacl_kit.viz import figures, tutorial, widgets

PACKAGE = Path(__file__).resolve().parent.parent / "hurmacl_kit"


@pytest.fixture
def slices():
    generator = np.random.default_rng(0)
    images = generator.random((3, 32, 32)).astype(np.float32)  # (S, X, Y)
    uncertainty = [10.0 ** generator.uniform(-6, 0, (3, 32 >> level, 32 >> level)) for level in range(4)]
    return images, uncertainty


def trace_names(figure):
    return [trace.name for trace in figure.data]


def test_slice_figure_traces():
    label = np.zeros((16, 16), dtype=np.uint8)
    label[4:8, 4:8] = 3
    figure = figures.slice_figure(np.zeros((16, 16)), label, {"background": 0, "RightParotid": 3})
    assert trace_names(figure) == ["CT", "organs"]
    assert figure.data[1].text[5][5] == "RightParotid"
    assert figure.data[1].text[0][0] == ""


def test_label_overlay_no_nan():
    label = np.zeros((8, 8), dtype=np.uint8)
    trace = figures.label_trace(label)
    assert np.isfinite(np.asarray(trace.z, dtype=float)).all()


def test_map_figure_traces():
    figure = figures.map_figure(np.zeros((16, 16)), np.ones((8, 8)), mask=np.ones((8, 8), dtype=bool))
    assert trace_names(figure) == ["CT", "map", "hard region"]
    assert np.asarray(figure.data[1].z).shape == (8, 8)


def test_offset_arrows_segments():
    offsets = np.zeros((18, 12, 12))
    offsets[1::2] = 2.0  # every tap moves 2 pixels along the columns (Y)
    figure = figures.offset_arrows_figure(np.zeros((12, 12)), offsets, stride=4)
    assert trace_names(figure) == ["CT", "offsets", "arrow heads"]
    segment_x = np.asarray(figure.data[1].x, dtype=float)
    segment_y = np.asarray(figure.data[1].y, dtype=float)
    assert len(segment_x) == 3 * 9
    assert np.allclose(segment_x[1::3] - segment_x[0::3], 2.0)
    assert np.allclose(segment_y[1::3], segment_y[0::3])


def test_loss_curve_append():
    figure = figures.loss_curve_figure(widget=True)
    figures.append_record(figure, {"step": 1, "loss": 3.0, "loss1": 1.0, "loss2": 1.5, "loss3": 0.5})
    figures.append_record(figure, {"step": 2, "loss": 2.0, "loss1": 0.8, "loss2": 1.0, "loss3": 0.2})
    assert isinstance(figure, go.FigureWidget)
    assert trace_names(figure) == ["loss", "loss1", "loss2", "loss3"]
    assert list(figure.data[0].y) == [3.0, 2.0]
    assert list(figure.data[3].x) == [1, 2]


def test_metric_bars_skip_none():
    summary = {"organs": {"Brainstem": {"dice_mean": 0.8}, "Larynx": {"dice_mean": None}}}
    figure = figures.metric_bar_figure(summary)
    assert list(figure.data[0].x) == ["Brainstem", "Larynx"]
    assert list(figure.data[0].y) == [0.8, None]


def test_uncertainty_widget_classes(slices):
    widget, state = widgets.uncertainty_explorer(*slices, slice_indices=[10, 11, 12])
    controls = widget.children[0].children
    assert "hurmacl-threshold-slider" in controls[0]._dom_classes
    assert "hurmacl-level-picker" in controls[1]._dom_classes
    assert "hurmacl-slice-picker" in controls[2]._dom_classes
    assert "hurmacl-hard-fraction" in state.fraction_text._dom_classes
    assert controls[0].value == pytest.approx(1e-3)
    assert controls[0].min == -4
    assert controls[0].max == -1


def test_uncertainty_update_fraction(slices):
    images, uncertainty = slices
    _, state = widgets.uncertainty_explorer(images, uncertainty, [10, 11, 12])
    low = state.update(threshold=1e-4)
    high = state.update(threshold=0.1)
    assert low == pytest.approx(float((uncertainty[0][0] > 1e-4).mean()))
    assert high == pytest.approx(float((uncertainty[0][0] > 0.1).mean()))
    assert high < low
    assert state.fraction_text.value == f"hard-region fraction: {100 * high:.2f}%"


def test_uncertainty_slider_drives_state(slices):
    widget, state = widgets.uncertainty_explorer(*slices, slice_indices=[10, 11, 12])
    slider, level_picker, slice_picker = widget.children[0].children
    slider.value = 0.05
    level_picker.value = 2
    slice_picker.value = 1
    assert state.threshold == pytest.approx(0.05)
    assert state.current_mask.shape == (8, 8)
    assert np.array_equal(np.asarray(state.figure.data[2].z), (slices[1][2][1] > state.threshold).astype(np.uint8))


def test_uncertainty_rejects_bad_threshold(slices):
    _, state = widgets.uncertainty_explorer(*slices, slice_indices=[10, 11, 12])
    with pytest.raises(ValueError):
        state.update(threshold=1.5)


def test_distillation_widget_counts():
    vim = np.zeros((2, 8, 8), dtype=bool)
    vim[1, :2] = True
    dcnn = np.zeros((2, 8, 8), dtype=bool)
    dcnn[1, 2:3] = True
    maps = [{"vim_teaches": vim, "dcnn_teaches": dcnn, "disagreement": np.zeros((2, 8, 8))}]
    widget, state = widgets.distillation_explorer(np.zeros((2, 8, 8)), maps, [5, 6])
    assert state.update(position=1) == {"vim_teaches": 16, "dcnn_teaches": 8}
    assert state.summary_text.value == "ViM teaches 16 pixels, DCNN teaches 8 pixels"
    assert "hurmacl-slice-picker" in widget.children[0].children[1]._dom_classes


def test_slice_viewer_update():
    volume = np.random.default_rng(0).random((8, 8, 5))
    label = np.zeros((8, 8, 5), dtype=np.uint8)
    label[2:4, 2:4, 3] = 1
    _, state = widgets.slice_viewer(volume, label, {"background": 0, "Brainstem": 1})
    state.update(3)
    assert np.array_equal(np.asarray(state.figure.data[0].z), volume[:, :, 3])
    assert state.figure.data[1].text[2][2] == "Brainstem"


def test_organ_slices_order():
    label = np.zeros((4, 4, 6), dtype=np.uint8)
    label[:, :, 4] = 1
    label[:2, :, 1] = 2
    label[0, 0, 5] = 3
    assert tutorial.organ_slices(label, 2) == [1, 4]


def test_repo_root_found():
    assert tutorial.find_repo_root(PACKAGE / "viz") == PACKAGE.parent


def test_checkpoint_lookup_order(tmp_path):
    for candidate in tutorial.CHECKPOINT_CANDIDATES:
        (tmp_path / candidate).parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, tmp_path / candidate)
    found = tutorial.find_or_train_checkpoint(tmp_path, tmp_path / "unused")
    assert found == tmp_path / tutorial.CHECKPOINT_CANDIDATES[0]


def test_lower_layers_skip_viz():
    for path in PACKAGE.rglob("*.py"):
        if "viz" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                assert not name.startswith(("plotly", "ipywidgets", "hurmacl_kit.viz")), f"{path} imports {name}"
