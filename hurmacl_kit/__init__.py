"""hurmacl-kit: HUR-MACL for head-and-neck organ-at-risk segmentation on CT.

HUR-MACL (high-uncertainty region-guided multi-architecture collaborative
learning) adds two branches, a Vision Mamba encoder and a deformable CNN, to
the hard regions of a 2D U-Net, where the hard region is the set of pixels
whose normalised softmax entropy exceeds a threshold T. The branches learn
from each other inside that region by heterogeneous feature distillation.

Typical use::

    import hurmacl_kit as kit
    u = kit.uncertainty.normalized_entropy(probabilities)

The method modules ``uncertainty``, ``branches`` and ``distill`` depend only on
torch and einops.
"""

from hurmacl_kit import branches, distill, uncertainty

__all__ = ["branches", "distill", "uncertainty"]
__version__ = "0.1.0"
