"""Datasets: COLMAP, nerfstudio transforms.json, Blender synthetic."""
