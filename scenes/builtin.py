"""Built-in scenes and the object library they are assembled from.

Each scene is a function ``build(seed) -> Scene`` registered in :data:`SCENES`; the seed
jitters placements (and noise textures) deterministically.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import numpy as np

from langfield.scenes.model import Keyframe, Light, Material, Obj, Prim, Scene, State, solid

# ----------------------------------------------------------------------------- library
WOOD = Material((0.55, 0.38, 0.22), "noise", (0.42, 0.27, 0.15), scale=14.0)
DARK_WOOD = Material((0.36, 0.24, 0.15), "noise", (0.26, 0.16, 0.09), scale=12.0)
METAL = solid(0.62, 0.63, 0.66)


def floor(name="floor", half=4.0, z=0.0, mat=None) -> Obj:
    mat = mat or Material((0.78, 0.78, 0.76), "checker", (0.62, 0.62, 0.6), scale=2.0)
    return Obj(name, [Prim("plane", (half, half), (0, 0, z), mat=mat)], queryable=False)


def table(pos, w=1.2, d=0.8, h=0.74, name="table", mat=WOOD) -> Obj:
    top = 0.03
    prims = [Prim("box", (w / 2, d / 2, top / 2), (0, 0, h - top / 2), mat=mat, part="table top")]
    for sx in (-1, 1):
        for sy in (-1, 1):
            prims.append(Prim("cylinder", (0.03, (h - top) / 2), (sx * (w / 2 - 0.08), sy * (d / 2 - 0.08), (h - top) / 2),
                              mat=mat, part="leg of the table"))
    return Obj(name, prims, pos, queries=("wooden table",))


def mug(pos, color, name="mug", queries=(), yaw=0.0) -> Obj:
    r, h = 0.042, 0.10
    body = Material(color)
    return Obj(name, [
        Prim("cylinder", (r, h / 2), (0, 0, h / 2), mat=body, part=f"body of the {name}"),
        Prim("cylinder", (r * 0.86, 0.002), (0, 0, h + 0.0005), mat=solid(0.25, 0.15, 0.08),
             part=f"body of the {name}", subpart=f"coffee in the {name}"),
        Prim("torus", (0.028, 0.008), (r + 0.012, 0, h / 2), rot=(90, 0, 0), mat=body, part=f"handle of the {name}"),
    ], pos, (0, 0, yaw), queries=tuple(queries) + ("mug", "coffee mug"))


def apple(pos, color=(0.78, 0.08, 0.07), name="red apple", queries=("apple", "fruit")) -> Obj:
    r = 0.04
    return Obj(name, [
        Prim("sphere", (r,), (0, 0, r), mat=Material(color, "noise", tuple(c * 0.75 for c in color), scale=30),
             part=f"skin of the {name}"),
        Prim("cylinder", (0.0035, 0.008), (0, 0, 2 * r + 0.004), mat=solid(0.35, 0.22, 0.1), part=f"stem of the {name}"),
        Prim("capsule", (0.004, 0.008), (0.009, 0, 2 * r + 0.006), rot=(0, 70, 0), mat=solid(0.2, 0.55, 0.15),
             part=f"stem of the {name}", subpart=f"leaf of the {name}"),
    ], pos, queries=queries)


def ball(pos, color, r=0.04, name="red ball", queries=("ball", "toy ball")) -> Obj:
    return Obj(name, [Prim("sphere", (r,), (0, 0, r), mat=Material(color, "stripes", tuple(min(1, c * 0.6 + 0.35) for c in color),
                                                                    scale=1 / (0.5 * r), axis=2))], pos, queries=queries)


def orange(pos, name="orange", queries=("fruit", "citrus")) -> Obj:
    r = 0.038
    return Obj(name, [
        Prim("sphere", (r,), (0, 0, r), mat=Material((0.95, 0.5, 0.05), "noise", (0.85, 0.4, 0.03), scale=60),
             part=f"peel of the {name}"),
        Prim("cylinder", (0.004, 0.002), (0, 0, 2 * r), mat=solid(0.3, 0.4, 0.1), part=f"stem of the {name}"),
    ], pos, queries=queries)


def banana(pos, yaw=0.0, name="banana") -> Obj:
    return Obj(name, [
        Prim("capsule", (0.018, 0.07), (0, 0, 0.018), rot=(0, 90, 0), mat=solid(0.95, 0.82, 0.2), part=f"peel of the {name}"),
        Prim("cylinder", (0.006, 0.01), (0.095, 0, 0.02), rot=(0, 90, 0), mat=solid(0.35, 0.3, 0.1), part=f"stem of the {name}"),
    ], pos, (0, 0, yaw), queries=("fruit", "yellow banana"))


def book_stack(pos, colors, yaw=0.0, name="stack of books") -> Obj:
    prims, z = [], 0.0
    for i, c in enumerate(colors):
        th = 0.025 + 0.008 * (i % 2)
        prims.append(Prim("box", (0.11, 0.075, th / 2), (0.004 * i, -0.003 * i, z + th / 2), rot=(0, 0, 4 * (i - 1)),
                          mat=Material(c, "stripes", (0.92, 0.9, 0.85), scale=1 / 0.012, axis=2), part="book",
                          subpart=f"book {i + 1}"))
        z += th
    return Obj(name, prims, pos, (0, 0, yaw), queries=("books", "pile of books"), part_queries={"book": ("a book",)})


def lamp(pos, yaw=0.0, name="lamp", shade=(0.95, 0.9, 0.75)) -> Obj:
    return Obj(name, [
        Prim("cylinder", (0.07, 0.01), (0, 0, 0.01), mat=METAL, part="base of the lamp"),
        Prim("capsule", (0.008, 0.14), (0, 0, 0.16), mat=METAL, part="arm of the lamp"),
        Prim("cone", (0.09, 0.12), (0, 0, 0.26), mat=Material(shade, "stripes", tuple(c * 0.85 for c in shade), scale=40, axis=2),
             part="lamp shade", subpart="body of the lamp shade"),
        Prim("torus", (0.088, 0.004), (0, 0, 0.262), mat=solid(0.7, 0.6, 0.3), part="lamp shade", subpart="rim of the lamp shade"),
        Prim("sphere", (0.03,), (0, 0, 0.27), mat=solid(1.0, 0.95, 0.75, emit=0.9), part="light bulb"),
    ], pos, (0, 0, yaw), queries=("desk lamp", "table lamp"))


def bowl(pos, color, name="bowl") -> Obj:
    return Obj(name, [Prim("sphere", (0.07,), (0, 0, 0.07), mat=Material(color)),
                      Prim("cylinder", (0.062, 0.002), (0, 0, 0.1), mat=solid(0.9, 0.9, 0.88), part=f"inside of the {name}")],
               pos, queries=("bowl", "dish"))


def can(pos, color, name="soda can") -> Obj:
    return Obj(name, [
        Prim("cylinder", (0.033, 0.06), (0, 0, 0.06), mat=Material(color, "stripes", (0.95, 0.95, 0.95), scale=1 / 0.02, axis=2),
             part=f"body of the {name}"),
        Prim("cylinder", (0.028, 0.002), (0, 0, 0.121), mat=METAL, part=f"lid of the {name}"),
    ], pos, queries=("can", "drink can"))


def candle(pos, color, name="red candle") -> Obj:
    return Obj(name, [
        Prim("cylinder", (0.03, 0.06), (0, 0, 0.06), mat=solid(*color), part=f"wax of the {name}"),
        Prim("cylinder", (0.002, 0.008), (0, 0, 0.127), mat=solid(0.1, 0.1, 0.1), part=f"wick of the {name}"),
        Prim("cone", (0.008, 0.03), (0, 0, 0.133), mat=solid(1.0, 0.75, 0.2, emit=1.0), part=f"flame of the {name}"),
    ], pos, queries=("candle",))


def chair(pos, yaw=0.0, name="chair", mat=DARK_WOOD) -> Obj:
    prims = [Prim("box", (0.22, 0.22, 0.02), (0, 0, 0.45), mat=mat, part="seat of the chair"),
             Prim("box", (0.22, 0.02, 0.22), (0, 0.2, 0.69), mat=mat, part="back of the chair")]
    for sx in (-1, 1):
        for sy in (-1, 1):
            prims.append(Prim("box", (0.02, 0.02, 0.215), (sx * 0.19, sy * 0.19, 0.215), mat=mat, part="leg of the chair"))
    return Obj(name, prims, pos, (0, 0, yaw), queries=("wooden chair", "seat"))


def sofa(pos, yaw=0.0, color=(0.25, 0.35, 0.55), name="sofa") -> Obj:
    fabric = Material(color, "noise", tuple(c * 0.8 for c in color), scale=40)
    return Obj(name, [
        Prim("box", (0.9, 0.4, 0.12), (0, 0, 0.3), mat=fabric, part="seat of the sofa"),
        Prim("box", (0.9, 0.1, 0.25), (0, 0.35, 0.55), mat=fabric, part="backrest of the sofa"),
        Prim("box", (0.08, 0.4, 0.2), (-0.92, 0, 0.4), mat=fabric, part="armrest of the sofa"),
        Prim("box", (0.08, 0.4, 0.2), (0.92, 0, 0.4), mat=fabric, part="armrest of the sofa"),
        Prim("box", (0.85, 0.36, 0.09), (0, 0, 0.09), mat=solid(0.2, 0.2, 0.22), part="base of the sofa"),
        Prim("capsule", (0.09, 0.18), (-0.45, 0.2, 0.5), rot=(0, 90, 0), mat=solid(0.85, 0.6, 0.3),
             part="cushions of the sofa", subpart="left cushion"),
        Prim("capsule", (0.09, 0.18), (0.45, 0.2, 0.5), rot=(0, 90, 0), mat=solid(0.8, 0.35, 0.35),
             part="cushions of the sofa", subpart="right cushion"),
    ], pos, (0, 0, yaw), queries=("couch", "blue sofa"))


def plant(pos, name="potted plant") -> Obj:
    return Obj(name, [
        Prim("cylinder", (0.12, 0.14), (0, 0, 0.14), mat=solid(0.7, 0.35, 0.2), part="pot of the plant"),
        Prim("cylinder", (0.015, 0.2), (0, 0, 0.45), mat=solid(0.35, 0.25, 0.12), part="stem of the plant"),
        Prim("sphere", (0.22,), (0, 0, 0.78), mat=Material((0.15, 0.45, 0.12), "noise", (0.3, 0.65, 0.2), scale=18),
             part="leaves of the plant"),
    ], pos, queries=("plant", "houseplant"))


def tv(pos, yaw=0.0, name="television") -> Obj:
    return Obj(name, [
        Prim("box", (0.5, 0.03, 0.3), (0, 0, 0.35), mat=solid(0.08, 0.08, 0.09), part="frame of the television"),
        Prim("plane", (0.47, 0.27), (0, -0.031, 0.35), rot=(90, 0, 0),
             mat=Material((0.15, 0.3, 0.6), "noise", (0.5, 0.7, 0.9), scale=6, emit=0.4), part="screen of the television"),
        Prim("box", (0.15, 0.08, 0.02), (0, 0, 0.02), mat=METAL, part="stand of the television"),
        Prim("box", (0.03, 0.02, 0.04), (0, 0, 0.06), mat=METAL, part="stand of the television"),
    ], pos, (0, 0, yaw), queries=("tv", "screen", "monitor"))


def cabinet(pos, yaw=0.0, name="cabinet", w=1.0, d=0.4, h=0.6) -> Obj:
    return Obj(name, [
        Prim("box", (w / 2, d / 2, h / 2), (0, 0, h / 2), mat=solid(0.85, 0.84, 0.8), part="body of the cabinet"),
        Prim("box", (w / 4 - 0.01, 0.005, h / 2 - 0.03), (-w / 4, -d / 2 - 0.005, h / 2), mat=solid(0.75, 0.74, 0.7),
             part="doors of the cabinet", subpart="left door"),
        Prim("box", (w / 4 - 0.01, 0.005, h / 2 - 0.03), (w / 4, -d / 2 - 0.005, h / 2), mat=solid(0.75, 0.74, 0.7),
             part="doors of the cabinet", subpart="right door"),
        Prim("capsule", (0.008, 0.05), (-0.03, -d / 2 - 0.015, h / 2), mat=METAL, part="doors of the cabinet",
             subpart="handle of the cabinet"),
        Prim("capsule", (0.008, 0.05), (0.03, -d / 2 - 0.015, h / 2), mat=METAL, part="doors of the cabinet",
             subpart="handle of the cabinet"),
    ], pos, (0, 0, yaw), queries=("sideboard", "white cabinet"))


def shelf_unit(pos, w=1.6, d=0.35, levels=(0.02, 0.45, 0.9, 1.35), name="shelf", yaw=0.0) -> Obj:
    prims = [Prim("box", (w / 2, d / 2, 0.015), (0, 0, z), mat=WOOD, part="board of the shelf") for z in levels]
    top = levels[-1] + 0.015
    for sx in (-1, 1):
        prims.append(Prim("box", (0.015, d / 2, top / 2), (sx * (w / 2 + 0.015), 0, top / 2), mat=WOOD, part="side of the shelf"))
    prims.append(Prim("box", (w / 2 + 0.03, 0.008, top / 2), (0, d / 2 + 0.008, top / 2), mat=DARK_WOOD, part="back of the shelf"))
    return Obj(name, prims, pos, (0, 0, yaw), queries=("bookshelf", "shelves"))


def rug(pos, name="rug") -> Obj:
    return Obj(name, [Prim("box", (0.9, 0.6, 0.004), (0, 0, 0.004),
                           mat=Material((0.7, 0.2, 0.2), "stripes", (0.9, 0.8, 0.6), scale=8, axis=0))],
               pos, queries=("carpet", "striped rug"))


def room_shell(x0, y0, x1, y1, height=2.6) -> List[Obj]:
    wall = Material((0.88, 0.86, 0.8), "noise", (0.8, 0.78, 0.72), scale=3)
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    fl = Material((0.6, 0.45, 0.3), "stripes", (0.52, 0.38, 0.25), scale=1 / 0.15, axis=0)
    return [
        Obj("floor", [Prim("plane", (hx, hy), (cx, cy, 0), mat=fl)], queries=("wooden floor",), queryable=True),
        Obj("wall", [
            Prim("plane", (hx, height / 2), (cx, y0, height / 2), rot=(90, 0, 0), mat=wall),
            Prim("plane", (hx, height / 2), (cx, y1, height / 2), rot=(90, 0, 0), mat=wall),
            Prim("plane", (hy, height / 2), (x0, cy, height / 2), rot=(90, 0, 90), mat=wall),
            Prim("plane", (hy, height / 2), (x1, cy, height / 2), rot=(90, 0, 90), mat=wall),
        ], queryable=False),
        Obj("ceiling", [Prim("plane", (hx, hy), (cx, cy, height), mat=solid(0.95, 0.95, 0.95))], queryable=False),
    ]


def _j(rng, s=0.02):
    return float(rng.uniform(-s, s))


# ----------------------------------------------------------------------------- scenes
def tabletop(seed: int = 0) -> Scene:
    """A table with two mugs, fruit (apple, orange, banana), a stack of books and a desk lamp."""
    rng = np.random.default_rng(seed)
    h = 0.74
    objs = [
        floor(),
        table((0, 0, 0), 1.2, 0.8, h),
        mug((0.28 + _j(rng), -0.16 + _j(rng), h), (0.8, 0.12, 0.1), "red mug", ("red cup",), yaw=rng.uniform(-60, 60)),
        mug((-0.05 + _j(rng), 0.22 + _j(rng), h), (0.15, 0.3, 0.75), "blue mug", ("blue cup",), yaw=rng.uniform(120, 240)),
        apple((0.02 + _j(rng), -0.12 + _j(rng), h)),
        orange((-0.1 + _j(rng), -0.2 + _j(rng), h)),
        banana((0.2 + _j(rng), 0.12 + _j(rng), h), yaw=rng.uniform(0, 180)),
        book_stack((-0.36 + _j(rng), -0.05 + _j(rng), h), [(0.2, 0.45, 0.25), (0.6, 0.15, 0.2), (0.2, 0.25, 0.5)],
                   yaw=rng.uniform(-20, 20)),
        lamp((0.4 + _j(rng), 0.24 + _j(rng), h), yaw=rng.uniform(0, 360)),
    ]
    lights = [Light("directional", (0.4, -0.3, 1.0), 0.6), Light("point", (0.3, 0.2, 1.9), 0.35)]
    return Scene("tabletop", objs, lights, ambient=0.3, center=(0, 0, h + 0.08), radius=1.3,
                 description="a wooden table with two mugs, fruit, books and a lamp", seed=seed)


def room(seed: int = 0) -> Scene:
    """A 6x5 m living room with furniture, for hand-held RGB-D mapping."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = -3.0, -2.5, 3.0, 2.5
    objs = room_shell(x0, y0, x1, y1)
    th = 0.74
    objs += [
        table((0.3 + _j(rng, 0.1), -0.2 + _j(rng, 0.1), 0), 1.4, 0.8, th, "dining table"),
        chair((0.3, -0.85, 0), yaw=180, name="chair"),
        chair((0.3, 0.45, 0), yaw=0, name="chair"),
        sofa((-1.0, 2.0, 0), yaw=0),
        rug((-1.0, 1.1, 0)),
        tv((-1.0, -2.28, 0.6), yaw=0),
        cabinet((-1.0, -2.25, 0), name="tv cabinet", w=1.4),
        shelf_unit((2.8, 0.3, 0), w=1.4, yaw=90),
        plant((2.5, -2.1, 0)),
        plant((-2.6, 2.1, 0), name="small plant"),
        mug((0.1, -0.3, th), (0.9, 0.9, 0.85), "white mug"),
        bowl((0.55, -0.1, th), (0.3, 0.6, 0.35), "green bowl"),
        apple((0.55, -0.1, th + 0.03)),
        lamp((-2.0, -2.1, 0.0), name="floor lamp"),
        book_stack((2.78, 0.5, 0.915), [(0.5, 0.2, 0.2), (0.2, 0.4, 0.6)], yaw=90),
        ball((2.1, 1.8, 0), (0.2, 0.6, 0.9), r=0.11, name="blue ball", queries=("ball", "beach ball")),
    ]
    lights = [Light("point", (0.0, 0.0, 2.4), 0.55), Light("point", (-1.5, 1.2, 2.3), 0.3)]
    return Scene("room", objs, lights, ambient=0.35, background=(0.2, 0.2, 0.2), center=(0, 0, 0.8), radius=2.5,
                 room=(x0, y0, x1, y1, 0.0, 2.6), default_kind="rgbd",
                 description="a 6x5 m living room (sofa, table, chairs, tv, shelf, plants) for RGB-D mapping", seed=seed)


def shelf(seed: int = 0) -> Scene:
    """A shelf of look-alike objects: hard negatives for text queries."""
    rng = np.random.default_rng(seed)
    objs = [floor(), shelf_unit((0, 0, 0))]
    z = [0.035, 0.465, 0.915]
    row0 = [apple((-0.6, 0, z[0])), ball((-0.35, 0, z[0]), (0.8, 0.1, 0.08), name="red ball"),
            Obj("tomato", [Prim("sphere", (0.035,), (0, 0, 0.035), mat=Material((0.9, 0.15, 0.05))),
                           Prim("cone", (0.015, 0.01), (0, 0, 0.068), mat=solid(0.2, 0.5, 0.15), part="calyx of the tomato")],
                (-0.1, 0, z[0]), queries=("vegetable", "red tomato")),
            apple((0.15, 0, z[0]), (0.5, 0.8, 0.2), "green apple"),
            ball((0.4, 0, z[0]), (0.85, 0.9, 0.25), r=0.033, name="tennis ball", queries=("ball", "yellow ball")),
            orange((0.62, 0, z[0]))]
    row1 = [mug((-0.55, 0, z[1]), (0.15, 0.3, 0.75), "blue mug", ("blue cup",), yaw=-90),
            Obj("blue cup", [Prim("cylinder", (0.04, 0.045), (0, 0, 0.045), mat=solid(0.15, 0.3, 0.75))], (-0.3, 0, z[1]),
                queries=("cup", "blue tumbler")),
            bowl((-0.02, 0, z[1]), (0.15, 0.3, 0.75), "blue bowl"),
            can((0.25, 0, z[1]), (0.8, 0.08, 0.08), "red soda can"),
            candle((0.5, 0, z[1]), (0.8, 0.1, 0.1), "red candle")]
    row2 = [book_stack((-0.45, 0, z[2]), [(0.6, 0.15, 0.2), (0.6, 0.15, 0.2)], name="red books"),
            book_stack((0.0, 0, z[2]), [(0.2, 0.25, 0.5), (0.2, 0.25, 0.5), (0.2, 0.25, 0.5)], name="blue books"),
            mug((0.4, 0, z[2]), (0.8, 0.12, 0.1), "red mug", ("red cup",), yaw=-90)]
    for o in row0 + row1 + row2:
        o.pos = (o.pos[0] + _j(rng, 0.02), o.pos[1] + _j(rng, 0.04), o.pos[2])
    objs += row0 + row1 + row2
    lights = [Light("directional", (0.3, -1.0, 0.8), 0.6), Light("point", (0.0, -1.2, 1.8), 0.3)]
    return Scene("shelf", objs, lights, ambient=0.35, center=(0, 0, 0.6), radius=1.9,
                 description="a shelf of look-alikes (red apple / red ball / tomato, blue mug / cup / bowl, can / candle)",
                 seed=seed)


def traffic_light(pos, yaw=0.0, name="traffic light") -> Obj:
    off = solid(0.12, 0.12, 0.12)
    return Obj(name, [
        Prim("cylinder", (0.02, 0.3), (0, 0, 0.3), mat=METAL, part="pole of the traffic light"),
        Prim("box", (0.06, 0.05, 0.13), (0, 0, 0.72), mat=solid(0.15, 0.15, 0.1), part="housing of the traffic light"),
        Prim("sphere", (0.035,), (0, -0.04, 0.79), mat=off, part="red lamp"),
        Prim("sphere", (0.035,), (0, -0.04, 0.65), mat=off, part="green lamp"),
    ], pos, (0, 0, yaw), queries=("signal", "stoplight"),
        # the state texts select the whole traffic light (4D LangSplat's state queries are object
        # masks: "the light that is red"), the lamp's colour is what changes
        states=[State("red light", colors={"red lamp": Material((1.0, 0.1, 0.05), emit=1.2)}),
                State("green light", colors={"green lamp": Material((0.1, 1.0, 0.2), emit=1.2)})],
        schedule=[(0.0, "red light"), (0.5, "green light")])


def lidded_box(pos, name="box") -> Obj:
    w, d, h = 0.14, 0.1, 0.08
    c = Material((0.75, 0.55, 0.3), "stripes", (0.68, 0.48, 0.25), scale=30, axis=0)
    return Obj(name, [
        Prim("box", (w, d, h), (0, 0, h), mat=c, part=f"body of the {name}"),
        Prim("box", (w + 0.005, d + 0.005, 0.008), (0, 0, 2 * h + 0.008), mat=solid(0.6, 0.4, 0.2), part=f"lid of the {name}"),
    ], pos, queries=("cardboard box", "package"),
        states=[State("closed box"), State("open box", moves={f"lid of the {name}": ((-110, 0, 0), (0, d + 0.005, 2 * h + 0.008), (0, 0, 0))})],
        schedule=[(0.0, "closed box"), (0.35, "open box"), (0.8, "closed box")])


def toy_car(keys, name="toy car", color=(0.85, 0.15, 0.1), schedule=()) -> Obj:
    """``schedule``: ``[(t, "parked toy car" | "moving toy car"), ...]`` (states of motion, no
    change of look: the time-sensitive field has to read them from the motion)."""
    wheel = solid(0.1, 0.1, 0.1)
    prims = [Prim("box", (0.12, 0.06, 0.03), (0, 0, 0.06), mat=solid(*color), part="body of the toy car"),
             Prim("box", (0.06, 0.05, 0.025), (-0.01, 0, 0.11), mat=solid(0.6, 0.8, 0.95), part="cabin of the toy car")]
    for sx in (-1, 1):
        for sy in (-1, 1):
            prims.append(Prim("cylinder", (0.03, 0.01), (sx * 0.08, sy * 0.065, 0.03), rot=(90, 0, 0), mat=wheel,
                              part="wheels of the toy car"))
    states = [State("parked toy car"), State("moving toy car")] if schedule else []
    return Obj(name, prims, keyframes=keys, queries=("car", "red car"), states=states, schedule=list(schedule))


def dynamic(seed: int = 0) -> Scene:
    """Moving objects and state changes over t in [0, 1]: a rolling ball, a driving toy car,
    a spinning top, a traffic light (red -> green) and a box that opens and closes.

    Time-sensitive states (whole-object queries): "red light" / "green light" (the traffic
    light, switching at t = 0.5), "closed box" / "open box" (open from 0.35 to 0.8), "parked
    toy car" / "moving toy car" (driving from 0.25 to 0.75)."""
    rng = np.random.default_rng(seed)
    objs = [floor(mat=Material((0.8, 0.8, 0.78), "checker", (0.66, 0.66, 0.64), scale=4.0))]
    a = rng.uniform(0, 2 * math.pi)
    ball_keys = [Keyframe(i / 8, (0.45 * math.cos(a + 1.6 * i / 8 * math.pi) * 0.9, 0.45 * math.sin(a + 1.6 * i / 8 * math.pi), 0.0),
                          (0, 0, 0)) for i in range(9)]
    b = ball((0, 0, 0), (0.2, 0.45, 0.9), r=0.06, name="blue ball", queries=("ball", "rolling ball"))
    b.prims[0].pos = (0.0, 0.0, 0.0)  # centred on the object origin so that it rolls in place
    for k in ball_keys:  # roll: rotate about a horizontal axis while travelling
        k.pos = (k.pos[0], k.pos[1], 0.06)
        k.rot = (0.0, 360.0 * k.t * 2, 0.0)
    b.keyframes = ball_keys
    # the car stands still until t = 0.25, drives until 0.75, then stands still again
    car_keys = [Keyframe(0.0, (-0.6, -0.35, 0), (0, 0, 0)), Keyframe(0.25, (-0.6, -0.35, 0), (0, 0, 0)),
                Keyframe(0.45, (0.0, -0.35, 0), (0, 0, 0)), Keyframe(0.6, (0.25, -0.2, 0), (0, 0, 60)),
                Keyframe(0.75, (0.3, 0.35, 0), (0, 0, 90)), Keyframe(1.0, (0.3, 0.35, 0), (0, 0, 90))]
    car_schedule = [(0.0, "parked toy car"), (0.25, "moving toy car"), (0.75, "parked toy car")]
    top = Obj("spinning top", [Prim("cone", (0.05, 0.07), (0, 0, 0.0), rot=(180, 0, 0), mat=solid(0.9, 0.75, 0.1),
                                    part="body of the spinning top"),
                               Prim("cylinder", (0.05, 0.006), (0, 0, 0.004), mat=Material((0.9, 0.2, 0.6), "stripes", (0.95, 0.9, 0.2),
                                                                                            scale=60, axis=0), part="disc of the spinning top"),
                               Prim("cylinder", (0.006, 0.02), (0, 0, 0.025), mat=solid(0.3, 0.2, 0.1), part="handle of the spinning top")],
              keyframes=[Keyframe(i / 4, (-0.25, 0.25, 0.072), (0, 0, 720 * i / 4)) for i in range(5)],
              queries=("top", "toy top"))
    objs += [b, toy_car(car_keys, schedule=car_schedule), top, traffic_light((0.35, 0.45, 0), yaw=rng.uniform(-20, 20)),
             lidded_box((-0.45, -0.05 + _j(rng), 0))]
    lights = [Light("directional", (0.5, -0.4, 1.0), 0.6), Light("point", (-0.5, -0.5, 1.6), 0.3)]
    return Scene("dynamic", objs, lights, ambient=0.3, center=(0, 0, 0.3), radius=1.8, default_kind="dynamic",
                 description="rolling ball, toy car parked/driving/parked, spinning top, traffic light red->green, "
                             "box opening and closing",
                 seed=seed)


def large(seed: int = 0, grid: int = 8) -> Scene:
    """A hall with a ``grid x grid`` array of tables, each with random objects (~1,000
    primitives), for scaling benchmarks."""
    rng = np.random.default_rng(seed)
    sp = 2.0
    half = grid * sp / 2
    objs = [floor(half=half + 1, mat=Material((0.7, 0.7, 0.72), "checker", (0.55, 0.55, 0.58), scale=1.0))]
    makers = [
        lambda p, i: mug(p, tuple(rng.uniform(0.1, 0.9, 3)), f"mug {i}", yaw=rng.uniform(0, 360)),
        lambda p, i: apple(p, name=f"apple {i}"),
        lambda p, i: orange(p, name=f"orange {i}"),
        lambda p, i: ball(p, tuple(rng.uniform(0.1, 0.9, 3)), name=f"ball {i}"),
        lambda p, i: can(p, tuple(rng.uniform(0.1, 0.9, 3)), f"can {i}"),
        lambda p, i: book_stack(p, [tuple(rng.uniform(0.1, 0.9, 3)) for _ in range(3)], name=f"books {i}"),
        lambda p, i: lamp(p, name=f"lamp {i}"),
    ]
    k = 0
    for gx in range(grid):
        for gy in range(grid):
            cx, cy = -half + sp * (gx + 0.5), -half + sp * (gy + 0.5)
            objs.append(table((cx, cy, 0), 1.0, 0.7, 0.74, name=f"table {gx}-{gy}"))
            for _ in range(int(rng.integers(3, 6))):
                p = (cx + rng.uniform(-0.4, 0.4), cy + rng.uniform(-0.25, 0.25), 0.74)
                objs.append(makers[int(rng.integers(len(makers)))](p, k))
                k += 1
    lights = [Light("directional", (0.3, -0.5, 1.0), 0.7)]
    return Scene("large", objs, lights, ambient=0.3, center=(0, 0, 0.7), radius=half * 1.3,
                 room=(-half, -half, half, half, 0.0, 3.0),
                 description=f"a {grid}x{grid} hall of tables with ~{k} random objects (scaling benchmark)", seed=seed)


SCENES: Dict[str, Callable[[int], Scene]] = {
    "tabletop": tabletop,
    "room": room,
    "shelf": shelf,
    "dynamic": dynamic,
    "large": large,
}


def get_scene(name: str, seed: int = 0) -> Scene:
    """Build a built-in scene; unknown names raise ValueError listing the known ones."""
    if name not in SCENES:
        raise ValueError(f"unknown scene {name!r}; known scenes: {', '.join(SCENES)}")
    return SCENES[name](seed)


def describe() -> List[Tuple[str, str, str, int, int]]:
    """(name, default kind, description, objects, primitives) for every built-in scene."""
    out = []
    for name, fn in SCENES.items():
        sc = fn(0)
        out.append((name, sc.default_kind, sc.description, len(sc.objects), sum(len(o.prims) for o in sc.objects)))
    return out
