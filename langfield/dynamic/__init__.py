"""Dynamic scenes (4D): deformable Gaussians, their trainer, language over time.

* :mod:`langfield.dynamic.field`: the deformation field (space-time plane grid or MLP);
* :mod:`langfield.dynamic.model`: :class:`DeformableGaussians`, the scene model (kind ``deformable``);
* :mod:`langfield.dynamic.train`: ``train_dynamic(data, out, ...)`` (RGB stage over time);
* :mod:`langfield.dynamic.language`: time-agnostic and time-sensitive language fields, and
  ``evaluate_dynamic_run``.
"""

from langfield.dynamic.field import DeformConfig, DeformationField
from langfield.dynamic.model import DeformableGaussians

__all__ = ["DeformConfig", "DeformationField", "DeformableGaussians"]
