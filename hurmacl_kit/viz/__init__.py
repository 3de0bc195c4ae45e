"""Plotly figures, ipywidgets explorers and notebook helpers.

This is the only layer that imports plotly or ipywidgets, and nothing else in
hurmacl_kit imports it.

- ``figures``: slices with organ and mask overlays, maps, offset arrows, loss curves, bars.
- ``widgets``: ``uncertainty_explorer``, ``distillation_explorer`` and ``slice_viewer``,
  each returning ``(widget, state)``.
- ``tutorial``: repository paths, a cached checkpoint and model outputs on real slices.
"""

from hurmacl_kit.viz import figures, tutorial, widgets
from hurmacl_kit.viz.widgets import distillation_explorer, slice_viewer, uncertainty_explorer

__all__ = ["distillation_explorer", "figures", "slice_viewer", "tutorial", "uncertainty_explorer", "widgets"]
