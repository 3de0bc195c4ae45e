"""hurmacl-kit: HUR-MACL for head-and-neck organ-at-risk segmentation on CT.

HUR-MACL (high-uncertainty region-guided multi-architecture collaborative
learning) adds two branches, a Vision Mamba encoder and a deformable CNN, to
the hard regions of a 2D U-Net. The hard region is the set of pixels whose
normalised softmax entropy exceeds a threshold T. The branches learn
from each other inside that region by heterogeneous feature distillation.

Typical use::

    import hurmacl_kit as kit
    u = kit.uncertainty.normalized_entropy(probabilities)
    model = kit.models.HURMACL(kit.models.HURMACLConfig())

The method modules ``uncertainty``, ``branches`` and ``distill`` depend only on
torch and einops and are imported eagerly. ``data``, ``metrics``, ``models``,
``engine`` and ``viz`` are imported on first access, so ``import hurmacl_kit``
does not pull in nibabel, MONAI or plotly.
"""

import importlib

from hurmacl_kit import branches, distill, uncertainty

__all__ = ["branches", "data", "distill", "engine", "metrics", "models", "uncertainty", "viz"]
__version__ = "0.1.0"

_LAZY_SUBMODULES = {"data", "engine", "metrics", "models", "viz"}


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"hurmacl_kit.{name}")
    raise AttributeError(f"module 'hurmacl_kit' has no attribute {name!r}")
