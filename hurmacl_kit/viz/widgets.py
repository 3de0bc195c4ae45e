"""ipywidgets explorers for the notebooks.

Each builder returns ``(widget, state)``. The widget is for people. The
state contains the data on screen and an ``update`` method that the widget's
callbacks call, so a test or a notebook without a front end can drive it
and assert on ``state``. CSS classes give browser tests stable selectors:

- ``hurmacl-threshold-slider``: the ``FloatLogSlider`` of T;
- ``hurmacl-hard-fraction``: the ``HTML`` text "hard-region fraction: 12.34%";
- ``hurmacl-level-picker`` and ``hurmacl-slice-picker``: ``Dropdown`` pickers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from hurmacl_kit import uncertainty as unc
from hurmacl_kit.viz import figures

THRESHOLD_CLASS = "hurmacl-threshold-slider"
FRACTION_CLASS = "hurmacl-hard-fraction"
LEVEL_CLASS = "hurmacl-level-picker"
SLICE_CLASS = "hurmacl-slice-picker"

# log10 U is drawn in [LOG_FLOOR, 0]; a confident pixel has U far below 1e-6.
LOG_FLOOR = -6.0


def format_fraction(fraction: float) -> str:
    """Return the hard-fraction text, e.g. "hard-region fraction: 12.34%"."""
    return f"hard-region fraction: {100.0 * fraction:.2f}%"


def _level_picker(shapes: Sequence[tuple[int, int]]) -> widgets.Dropdown:
    options = [(f"level {level} ({height} x {width})", level) for level, (height, width) in enumerate(shapes)]
    picker = widgets.Dropdown(options=options, value=0, description="level")
    picker.add_class(LEVEL_CLASS)
    return picker


def _slice_picker(slice_indices: Sequence[int]) -> widgets.Dropdown:
    options = [(f"z = {z}", position) for position, z in enumerate(slice_indices)]
    picker = widgets.Dropdown(options=options, value=0, description="slice")
    picker.add_class(SLICE_CLASS)
    return picker


@dataclass
class UncertaintyState:
    """Data behind the uncertainty explorer.

    Attributes:
        images: (S, X, Y) CT slices in [0, 1].
        uncertainty: One (S, H_l, W_l) normalised-entropy array per decoder level.
        slice_indices: Axial index z of each of the S slices.
        threshold: Current T.
        level: Current decoder level.
        position: Current slice, an index into the S slices.
        figure: The ``FigureWidget`` (traces "CT", "map", "hard region").
        fraction_text: The ``HTML`` widget showing ``format_fraction``.
    """

    images: np.ndarray
    uncertainty: list[np.ndarray]
    slice_indices: list[int]
    threshold: float = unc.DEFAULT_THRESHOLD
    level: int = 0
    position: int = 0
    figure: go.FigureWidget | None = None
    fraction_text: widgets.HTML | None = None

    @property
    def current_map(self) -> np.ndarray:
        """Normalised entropy (H_l, W_l) of the shown slice and level."""
        return self.uncertainty[self.level][self.position]

    @property
    def current_mask(self) -> np.ndarray:
        """Hard-region mask U > T (H_l, W_l) of the shown slice and level."""
        return self.current_map > self.threshold

    @property
    def hard_fraction(self) -> float:
        """Share of pixels of the shown slice and level with U > T."""
        return float(self.current_mask.mean())

    def update(self, threshold: float | None = None, level: int | None = None, position: int | None = None) -> float:
        """Change any of T, level and slice, redraw, and return the new hard fraction."""
        if threshold is not None:
            unc.validate_threshold(threshold)
            self.threshold = float(threshold)
        if level is not None:
            self.level = int(level)
        if position is not None:
            self.position = int(position)

        fraction = self.hard_fraction
        if self.figure is not None:
            with self.figure.batch_update():
                self.figure.data[0].z = self.images[self.position]
                self.figure.data[1].z = np.log10(np.maximum(self.current_map, 10**LOG_FLOOR))
                self.figure.data[2].z = self.current_mask.astype(np.uint8)
                self.figure.layout.title = f"slice z = {self.slice_indices[self.position]}, level {self.level}, T = {self.threshold:.1e}"
        if self.fraction_text is not None:
            self.fraction_text.value = format_fraction(fraction)
        return fraction


def uncertainty_explorer(
    images: np.ndarray,
    uncertainty: Sequence[np.ndarray],
    slice_indices: Sequence[int],
    threshold: float = unc.DEFAULT_THRESHOLD,
) -> tuple[widgets.Widget, UncertaintyState]:
    """Build the threshold slider, level and slice pickers over an uncertainty map and its hard-region mask.

    Args:
        images: (S, X, Y) CT slices in [0, 1].
        uncertainty: One (S, H_l, W_l) normalised-entropy array per decoder level, finest first.
        slice_indices: Axial index z of each slice, for the labels.
        threshold: Initial T, within the slider's range [1e-4, 0.1].

    Returns:
        The widget and its ``UncertaintyState``.
    """
    state = UncertaintyState(np.asarray(images), [np.asarray(level) for level in uncertainty], list(slice_indices))
    state.figure = figures.map_figure(
        state.images[0], np.zeros_like(state.uncertainty[0][0]), mask=np.zeros_like(state.uncertainty[0][0], dtype=bool),
        colorscale="Inferno", zmin=LOG_FLOOR, zmax=0.0, widget=True,
    )
    state.figure.data[1].colorbar.title = "log10 U"
    state.fraction_text = widgets.HTML()
    state.fraction_text.add_class(FRACTION_CLASS)

    slider = widgets.FloatLogSlider(value=threshold, base=10, min=-4, max=-1, step=0.05, description="T", readout_format=".1e")
    slider.add_class(THRESHOLD_CLASS)
    level_picker = _level_picker([level.shape[1:] for level in state.uncertainty])
    slice_picker = _slice_picker(state.slice_indices)

    slider.observe(lambda change: state.update(threshold=change["new"]), names="value")
    level_picker.observe(lambda change: state.update(level=change["new"]), names="value")
    slice_picker.observe(lambda change: state.update(position=change["new"]), names="value")
    state.update(threshold=threshold)

    controls = widgets.HBox([slider, level_picker, slice_picker])
    return widgets.VBox([controls, state.fraction_text, state.figure]), state


@dataclass
class DistillationState:
    """Data behind the distillation explorer.

    Attributes:
        images: (S, X, Y) CT slices in [0, 1].
        maps: One dict per level with (S, H_l, W_l) arrays "vim_teaches",
            "dcnn_teaches" (bool) and "disagreement" (float in [0, 1]).
        slice_indices: Axial index z of each slice.
        level: Current decoder level.
        position: Current slice, an index into the S slices.
        figure: ``FigureWidget`` with traces "CT", "ViM teaches", "DCNN teaches", "disagreement".
        summary_text: ``HTML`` widget with the pixel counts of the shown slice.
    """

    images: np.ndarray
    maps: list[Mapping[str, np.ndarray]]
    slice_indices: list[int]
    level: int = 0
    position: int = 0
    figure: go.FigureWidget | None = None
    summary_text: widgets.HTML | None = None

    def current(self, name: str) -> np.ndarray:
        """Return map ``name`` (H_l, W_l) at the shown slice and level."""
        return np.asarray(self.maps[self.level][name][self.position])

    def counts(self) -> dict[str, int]:
        """Return the pixel counts of each teaching direction on the shown slice and level."""
        return {
            "vim_teaches": int(self.current("vim_teaches").sum()),
            "dcnn_teaches": int(self.current("dcnn_teaches").sum()),
        }

    def update(self, level: int | None = None, position: int | None = None) -> dict[str, int]:
        """Change the level or slice, redraw, and return ``counts()``."""
        if level is not None:
            self.level = int(level)
        if position is not None:
            self.position = int(position)

        counts = self.counts()
        if self.figure is not None:
            with self.figure.batch_update():
                self.figure.data[0].z = self.images[self.position]
                self.figure.data[1].z = self.current("vim_teaches").astype(np.uint8)
                self.figure.data[2].z = self.current("dcnn_teaches").astype(np.uint8)
                self.figure.data[3].z = self.current("disagreement")
                self.figure.layout.title = f"slice z = {self.slice_indices[self.position]}, level {self.level}"
        if self.summary_text is not None:
            self.summary_text.value = (
                f"ViM teaches {counts['vim_teaches']} pixels, DCNN teaches {counts['dcnn_teaches']} pixels"
            )
        return counts


def distillation_explorer(
    images: np.ndarray, maps: Sequence[Mapping[str, np.ndarray]], slice_indices: Sequence[int]
) -> tuple[widgets.Widget, DistillationState]:
    """Build level and slice pickers over the distillation direction map and the branch disagreement.

    Args:
        images: (S, X, Y) CT slices in [0, 1].
        maps: One dict per level, see ``DistillationState.maps``.
        slice_indices: Axial index z of each slice.

    Returns:
        The widget and its ``DistillationState``.
    """
    state = DistillationState(np.asarray(images), list(maps), list(slice_indices))
    empty = np.zeros_like(np.asarray(maps[0]["disagreement"][0]), dtype=float)

    figure = go.FigureWidget()
    figure.set_subplots(rows=1, cols=2, horizontal_spacing=0.02, subplot_titles=("direction map", "disagreement"))
    figure.add_trace(figures.ct_trace(state.images[0]), row=1, col=1)
    figure.add_trace(figures.mask_trace(empty > 0, color="#1f77b4", opacity=0.7, name="ViM teaches"), row=1, col=1)
    figure.add_trace(figures.mask_trace(empty > 0, color="#ff7f0e", opacity=0.7, name="DCNN teaches"), row=1, col=1)
    figure.add_trace(go.Heatmap(z=empty, colorscale="Viridis", zmin=0.0, zmax=1.0, name="disagreement"), row=1, col=2)
    figure.update_layout(height=420, margin=dict(l=10, r=10, t=60, b=10))
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False, autorange="reversed")
    figure.update_layout(yaxis=dict(scaleanchor="x"), yaxis2=dict(scaleanchor="x2"))
    state.figure = figure
    state.summary_text = widgets.HTML()

    level_picker = _level_picker([np.asarray(level["disagreement"]).shape[1:] for level in maps])
    slice_picker = _slice_picker(state.slice_indices)
    level_picker.observe(lambda change: state.update(level=change["new"]), names="value")
    slice_picker.observe(lambda change: state.update(position=change["new"]), names="value")
    state.update()

    return widgets.VBox([widgets.HBox([level_picker, slice_picker]), state.summary_text, figure]), state


@dataclass
class SliceViewerState:
    """Data behind the slice viewer: a windowed volume (X, Y, Z), its labels and the shown slice z."""

    volume: np.ndarray
    label: np.ndarray | None
    label_names: Mapping[str, int] | None
    z: int
    figure: go.FigureWidget | None = None

    def update(self, z: int) -> None:
        """Show axial slice ``z``."""
        self.z = int(z)
        if self.figure is None:
            return
        with self.figure.batch_update():
            self.figure.data[0].z = self.volume[:, :, self.z]
            if self.label is not None:
                layer = self.label[:, :, self.z]
                self.figure.data[1].z = layer
                self.figure.data[1].text = figures.label_hover_text(layer, self.label_names)
            self.figure.layout.title = f"axial slice z = {self.z}"


def slice_viewer(
    volume: np.ndarray, label: np.ndarray | None = None, label_names: Mapping[str, int] | None = None, z: int | None = None
) -> tuple[widgets.Widget, SliceViewerState]:
    """Build an axial slice viewer with an organ overlay and a z slider.

    Args:
        volume: (X, Y, Z) windowed CT in [0, 1].
        label: (X, Y, Z) label map, or None.
        label_names: Organ name to label value, for hover text.
        z: First slice shown; the middle slice if None.
    """
    z = volume.shape[2] // 2 if z is None else int(z)
    state = SliceViewerState(volume, label, label_names, z)
    state.figure = figures.slice_figure(
        volume[:, :, z], None if label is None else label[:, :, z], label_names, widget=True
    )
    slider = widgets.IntSlider(value=z, min=0, max=volume.shape[2] - 1, description="z")
    slider.observe(lambda change: state.update(change["new"]), names="value")
    state.update(z)
    return widgets.VBox([slider, state.figure]), state
