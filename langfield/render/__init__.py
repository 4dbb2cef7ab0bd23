"""Rendering: ``rasterization()`` with gsplat's call on langfield's native renderer, and
``render(model, cameras, ...)``, the one render path every caller uses."""

from langfield.render.api import BACKENDS, RENDER_MODES, rasterization, resolve_backend
from langfield.render.model import Cameras, RenderOutput, render

__all__ = ["rasterization", "resolve_backend", "BACKENDS", "RENDER_MODES", "render", "Cameras", "RenderOutput"]
