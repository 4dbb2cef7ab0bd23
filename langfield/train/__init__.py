"""Training: the RGB stage (:mod:`langfield.train.rgb`) and, later, the language stage.

``train_rgb(data, out, steps=...)`` trains (or ``resume=True`` continues) a run folder;
:class:`TrainConfig` holds every option; the CLI is ``langfield train|render|eval|export``.
Imports are lazy so ``import langfield.train`` stays cheap.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "RGBTrainer", "train_rgb", "RunError", "NonFiniteError", "rgb_loss"]


def __getattr__(name):
    if name == "TrainConfig":
        from langfield.train.config import TrainConfig

        return TrainConfig
    if name == "rgb_loss":
        from langfield.train.losses import rgb_loss

        return rgb_loss
    if name in ("RGBTrainer", "train_rgb", "RunError", "NonFiniteError"):
        from langfield.train import rgb

        return getattr(rgb, name)
    raise AttributeError(f"module 'langfield.train' has no attribute {name!r}")
