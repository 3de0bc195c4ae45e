"""Named training settings: a short CPU run for the demo and CI, and a full GPU run.

A preset fills ``TrainConfig`` fields; command-line options override it.
"""

from __future__ import annotations

# Small branches for CPU runs. With them a demo step at batch 8 on 96 x 96 crops
# took about 1.5 s on 2 idle cores while every pixel was hard. It took about
# 0.4 s once the hard region fell below 10% (python -m hurmacl_kit train --preset demo).
CPU_BRANCHES = dict(vim_d_model=16, vim_depth=1, vim_patch_size=8, dcnn_hidden=8, dcnn_layers=1)

# NOTE: the CPU presets start at lr 1e-2, nnU-Net's initial rate, instead of HUR-MACL's
# 1e-3, because a few hundred steps at 1e-3 leave the organs unlearned.
PRESETS: dict[str, dict] = {
    "demo": dict(steps=1200, batch_size=8, patch_size=96, learning_rate=1e-2, checkpoint_every=50, model=CPU_BRANCHES),
    "quick": dict(steps=20, batch_size=4, patch_size=64, learning_rate=1e-2, checkpoint_every=10, model=CPU_BRANCHES),
    "full": dict(steps=25000, batch_size=16, patch_size=None, checkpoint_every=500, model={}),
}


def preset(name: str) -> dict:
    """Return a copy of the named preset's ``TrainConfig`` fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values["model"] = dict(values["model"])
    return values
