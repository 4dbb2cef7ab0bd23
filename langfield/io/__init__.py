"""Reading and writing scenes: 3DGS PLY files and safetensors checkpoints."""

from .checkpoint import (Checkpoint, CheckpointError, CheckpointNotFoundError, atomic_write_bytes, atomic_write_json,
                         latest_checkpoint, latest_valid_checkpoint, load_checkpoint, load_gsplat_ckpt,
                         load_gaussians, quarantine_checkpoint, save_checkpoint, save_gaussians,
                         verify_checkpoint)
from .ply import PlyError, PlyLayout, read_ply, read_points_ply, standard_property_names, write_ply, write_points_ply

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointNotFoundError", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "latest_valid_checkpoint", "save_gaussians", "load_gaussians", "verify_checkpoint", "quarantine_checkpoint", "load_gsplat_ckpt",
    "atomic_write_bytes", "atomic_write_json",
    "PlyError", "PlyLayout", "read_ply", "write_ply", "read_points_ply", "write_points_ply",
    "standard_property_names",
]
