"""Plotly figures for the notebooks: CT slices with overlays, maps, offset arrows, curves and bars.

Every 2D array is one axial slice in the case's (X, Y) voxel order, drawn as
stored: rows (X) top to bottom, columns (Y) left to right. For the OpenKBP
sample, whose X runs anterior to posterior and Y patient right to left, that
is the radiological view: anterior up, the patient's right on the left.
Builders return ``go.Figure``, or ``go.FigureWidget``
with ``widget=True``, whose traces a widget can update in place.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

# One colour per label value 1..7 (background is transparent).
ORGAN_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6")
MASK_COLOR = "#ffd700"  # gold, over grey CT
MAP_MASK_COLOR = "#00e5ff"  # cyan, over the yellow end of the map colour scales
TRANSPARENT = "rgba(0, 0, 0, 0)"


def _new_figure(widget: bool) -> go.Figure:
    return go.FigureWidget() if widget else go.Figure()


def _layout_image(figure: go.Figure, title: str, height: int = 420) -> go.Figure:
    figure.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10))
    figure.update_xaxes(visible=False, constrain="domain")
    figure.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return figure


def ct_trace(image: np.ndarray, name: str = "CT") -> go.Heatmap:
    """Return a grey heatmap of a windowed CT slice (X, Y) with values in [0, 1]."""
    return go.Heatmap(z=np.asarray(image), colorscale="gray", zmin=0.0, zmax=1.0, showscale=False, name=name)


def label_trace(label: np.ndarray, label_names: Mapping[str, int] | None = None, opacity: float = 0.5) -> go.Heatmap:
    """Return a heatmap of organ labels (X, Y) with background transparent."""
    # Bin k of the colour scale colours label value k, and bin 0 (background) is fully transparent.
    # Transparency rather than NaN keeps the data JSON-compliant for FigureWidget.
    colors = (TRANSPARENT,) + ORGAN_COLORS
    count = len(colors)
    colorscale = []
    for index, color in enumerate(colors):
        colorscale += [[index / count, color], [(index + 1) / count, color]]

    return go.Heatmap(
        z=np.asarray(label, dtype=np.uint8), zmin=-0.5, zmax=count - 0.5, colorscale=colorscale, opacity=opacity,
        showscale=False, text=label_hover_text(label, label_names), hovertemplate="%{text}<extra></extra>", name="organs",
    )


def label_hover_text(label: np.ndarray, label_names: Mapping[str, int] | None = None) -> np.ndarray:
    """Return the organ name at each pixel of ``label`` (X, Y), or "" on background."""
    names = np.array([""] + [str(value) for value in range(1, 256)], dtype=object)
    for name, value in (label_names or {}).items():
        if value > 0:
            names[value] = name
    return names[np.asarray(label, dtype=np.uint8)]


def mask_trace(mask: np.ndarray, color: str = MASK_COLOR, opacity: float = 0.45, name: str = "hard region") -> go.Heatmap:
    """Return a single-colour overlay of a boolean mask (X, Y), transparent where False."""
    values = np.asarray(mask, dtype=np.uint8)
    return go.Heatmap(
        z=values, zmin=0.0, zmax=1.0, colorscale=[[0, TRANSPARENT], [0.5, TRANSPARENT], [0.5, color], [1, color]], opacity=opacity,
        showscale=False, name=name, hoverinfo="skip",
    )


def slice_figure(
    image: np.ndarray,
    label: np.ndarray | None = None,
    label_names: Mapping[str, int] | None = None,
    title: str = "",
    widget: bool = False,
) -> go.Figure:
    """Draw a CT slice (X, Y) with an optional organ overlay: traces "CT" and "organs"."""
    figure = _new_figure(widget)
    figure.add_trace(ct_trace(image))
    if label is not None:
        figure.add_trace(label_trace(label, label_names))
    return _layout_image(figure, title)


def map_figure(
    image: np.ndarray,
    values: np.ndarray,
    mask: np.ndarray | None = None,
    title: str = "",
    colorscale: str = "Inferno",
    zmin: float = 0.0,
    zmax: float = 1.0,
    widget: bool = False,
) -> go.Figure:
    """Draw a CT slice and, side by side, a scalar map (e.g. uncertainty) with an optional mask overlay.

    Traces, in order: "CT", "map", and "hard region" when ``mask`` is given.
    The map may have a coarser grid than the image (a deeper decoder level).
    """
    figure = _new_figure(widget)
    figure.set_subplots(rows=1, cols=2, horizontal_spacing=0.02)
    figure.add_trace(ct_trace(image), row=1, col=1)
    figure.add_trace(
        go.Heatmap(z=np.asarray(values), colorscale=colorscale, zmin=zmin, zmax=zmax, name="map",
                   colorbar=dict(len=0.8)),
        row=1, col=2,
    )
    if mask is not None:
        figure.add_trace(mask_trace(mask, color=MAP_MASK_COLOR), row=1, col=2)
    _layout_image(figure, title)
    figure.update_layout(yaxis=dict(scaleanchor="x"), yaxis2=dict(scaleanchor="x2"))  # square pixels in each panel
    return figure


def offset_arrows_figure(
    image: np.ndarray,
    offsets: np.ndarray,
    stride: int = 6,
    scale: float = 1.0,
    mask: np.ndarray | None = None,
    title: str = "",
) -> go.Figure:
    """Draw the mean sampling displacement of a deformable layer as arrows on a slice.

    Args:
        image: (X, Y) background slice, in [0, 1].
        offsets: (2 * 9, X, Y) offsets of one layer with one offset group, in
            torchvision's layout: channel 2k is the row (X) offset of tap k and
            channel 2k + 1 the column (Y) offset, in pixels.
        stride: Draw one arrow every ``stride`` pixels.
        scale: Multiply arrow lengths by this, for visibility.
        mask: Optional (X, Y) mask drawn underneath.
        title: Figure title.

    Returns:
        A figure with traces "CT", optionally "hard region", "offsets" (segments) and "arrow heads".
    """
    mean_row = offsets[0::2].mean(0)  # (X, Y)
    mean_col = offsets[1::2].mean(0)
    rows, cols = np.meshgrid(np.arange(0, image.shape[0], stride), np.arange(0, image.shape[1], stride), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()

    # Plot x is the column and plot y the row. One line segment per arrow, each
    # followed by a NaN point that plotly draws as a gap, so one trace draws all arrows.
    ends_row = rows + scale * mean_row[rows, cols]
    ends_col = cols + scale * mean_col[rows, cols]
    segment_x = np.stack([cols, ends_col, np.full(cols.shape, np.nan)], 1).ravel()
    segment_y = np.stack([rows, ends_row, np.full(rows.shape, np.nan)], 1).ravel()

    figure = go.Figure()
    figure.add_trace(ct_trace(image))
    if mask is not None:
        figure.add_trace(mask_trace(mask))
    figure.add_trace(go.Scatter(x=segment_x, y=segment_y, mode="lines", line=dict(color="cyan", width=1.5), name="offsets"))
    figure.add_trace(go.Scatter(x=ends_col, y=ends_row, mode="markers", marker=dict(color="cyan", size=3), name="arrow heads"))
    return _layout_image(figure, title, height=520)


def direction_figure(
    image: np.ndarray, vim_teaches: np.ndarray, dcnn_teaches: np.ndarray, title: str = "", widget: bool = False
) -> go.Figure:
    """Draw where each branch teaches the other: traces "CT", "ViM teaches" (blue), "DCNN teaches" (orange)."""
    figure = _new_figure(widget)
    figure.add_trace(ct_trace(image))
    figure.add_trace(mask_trace(vim_teaches, color="#1f77b4", opacity=0.7, name="ViM teaches"))
    figure.add_trace(mask_trace(dcnn_teaches, color="#ff7f0e", opacity=0.7, name="DCNN teaches"))
    return _layout_image(figure, title)


def loss_curve_figure(history: Sequence[Mapping[str, float]] = (), keys=("loss", "loss1", "loss2", "loss3"), widget: bool = False) -> go.Figure:
    """Draw training losses against the step, one trace per key; ``append_record`` extends it live."""
    figure = _new_figure(widget)
    for key in keys:
        figure.add_trace(go.Scatter(
            x=[record["step"] for record in history], y=[record[key] for record in history], mode="lines", name=key
        ))
    figure.update_layout(title="training loss", xaxis_title="step", yaxis_title="loss", height=360)
    return figure


def append_record(figure: go.Figure, record: Mapping[str, float]) -> None:
    """Append one training record (a ``train`` callback argument) to a ``loss_curve_figure``."""
    # A FigureWidget sends the changes of all traces to the front end in one message.
    batch = figure.batch_update() if isinstance(figure, go.FigureWidget) else contextlib.nullcontext()
    with batch:
        for trace in figure.data:
            trace.x = tuple(trace.x or ()) + (record["step"],)
            trace.y = tuple(trace.y or ()) + (record[trace.name],)


def metric_bar_figure(summary: Mapping, metric: str = "dice_mean", title: str = "") -> go.Figure:
    """Draw one bar per organ from an ``evaluate`` summary (``summary["organs"][organ][metric]``)."""
    organs = list(summary["organs"])
    values = [summary["organs"][organ][metric] for organ in organs]
    figure = go.Figure(go.Bar(x=organs, y=values, name=metric))
    figure.update_layout(title=title or metric, yaxis_title=metric, height=360)
    return figure


def sweep_figure(thresholds: Sequence[float], fractions: Sequence[float], title: str = "hard-region fraction vs T") -> go.Figure:
    """Draw a hard-region fraction against the threshold T on a log axis."""
    figure = go.Figure(go.Scatter(x=list(thresholds), y=list(fractions), mode="lines+markers", name="hard fraction"))
    figure.update_layout(title=title, xaxis_type="log", xaxis_title="threshold T", yaxis_title="hard fraction", height=340)
    return figure
