"""Evaluation: image metrics (PSNR, SSIM), the language protocol (LERF-ovs + 3D,
:mod:`langfield.eval.language`), trajectories (ATE / RPE as evo computes them,
:mod:`langfield.eval.trajectory`) and views of a scene on a dataset (:mod:`langfield.eval.views`)."""

from langfield.eval.metrics import psnr, ssim
from langfield.eval.trajectory import ate, read_tum_trajectory, rpe, trajectory_report, write_tum_trajectory

__all__ = ["psnr", "ssim", "ate", "rpe", "trajectory_report", "read_tum_trajectory", "write_tum_trajectory"]
