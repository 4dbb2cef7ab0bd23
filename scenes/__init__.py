"""Procedural scenes with exact ground truth (colour, depth, poses, hierarchical labels,
motion and states) and writers for the dataset formats langfield reads.

Quick use::

    from langfield.scenes import get_scene, make_scene
    make_scene("tabletop", "out/tabletop", views=64, size=(256, 256))

See scenes/README.md for the scene format and the output layout.
"""

from langfield.scenes.builtin import SCENES, get_scene
from langfield.scenes.model import LEVELS, Keyframe, Light, Material, Obj, Prim, Scene, State

__all__ = ["SCENES", "LEVELS", "get_scene", "make_scene", "render_view", "Keyframe", "Light", "Material", "Obj",
           "Prim", "Scene", "State"]


def __getattr__(name):  # lazy: keep `import langfield.scenes` free of torch
    if name == "make_scene":
        from langfield.scenes.make import make_scene

        return make_scene
    if name == "render_view":
        from langfield.scenes.raycast import render_view

        return render_view
    raise AttributeError(name)
