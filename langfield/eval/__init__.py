"""Evaluation: image metrics (PSNR, SSIM); later the LERF-ovs protocol and trajectory ATE."""

from langfield.eval.metrics import psnr, ssim

__all__ = ["psnr", "ssim"]
