"""Rendering: ``rasterization()`` with gsplat's call on langfield's native renderer."""

from langfield.render.api import BACKENDS, RENDER_MODES, rasterization, resolve_backend

__all__ = ["rasterization", "resolve_backend", "BACKENDS", "RENDER_MODES"]
