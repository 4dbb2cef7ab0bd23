"""3D Gaussian splatting PLY files.

The standard layout (what the original 3DGS code writes, and what every 3DGS viewer reads) is
one ``vertex`` element of float32 properties::

    x y z nx ny nz f_dc_0..2 f_rest_0..(3*(K-1)-1) opacity scale_0..2 rot_0..3

with ``f_rest`` channel-major (all red coefficients, then green, then blue: 3DGS stores its
``[N, K-1, 3]`` features transposed to ``[N, 3, K-1]`` and flattened), log scales, logit
opacities and wxyz quaternions. gsplat's exporter writes the same without the normals;
SuperSplat and others reorder properties. Reading goes by property name, so all of them
load; the SH degree (0-3, or higher) is inferred from the number of ``f_rest`` properties.
langfield adds ``lang_0 .. lang_{L-1}`` for language latents.

Any PLY encoding plyfile reads works (binary little/big-endian, ASCII, CRLF header lines,
double or integer properties, other elements such as faces). A file whose colour is stored as
``red green blue`` instead of ``f_dc_*`` (nerfstudio's ``ply_color_mode=rgb`` export) gets
``sh0`` from those colours. NaN or infinite values (an infinite logit opacity aside) are read as
they are, with a warning.

``read_ply(..., return_layout=True)`` also returns the file's :class:`PlyLayout` (property
order, types, comments, unknown extra properties; not vertex list properties);
``write_ply(..., layout=layout)`` reproduces that layout, so an unmodified file re-saves byte
for byte.

Also reads the compressed PLY of SuperSplat / PlayCanvas / gsplat's ``ply_compressed``
(lossy by construction) and plain point clouds (``read_points_ply``) for initialisation.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from langfield.maths import SH_C0, sh_degree_from_bases
from langfield.scene import Gaussians

__all__ = ["PlyError", "PlyLayout", "read_ply", "write_ply", "read_points_ply", "write_points_ply",
           "standard_property_names"]

PathLike = Union[str, os.PathLike]


class PlyError(ValueError):
    """A PLY file that cannot be read as what was asked (names the file)."""


@dataclass
class PlyLayout:
    """How a Gaussian PLY file was laid out: vertex properties ``(name, numpy dtype str)``
    in file order, header comments and obj_info lines, byte order, and the values of
    properties langfield does not interpret (kept so the file re-saves unchanged)."""

    properties: List[Tuple[str, str]]
    comments: List[str] = field(default_factory=list)
    obj_info: List[str] = field(default_factory=list)
    byte_order: str = "<"
    text: bool = False
    extra: Optional[np.ndarray] = None  # structured array of the unknown properties

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self.properties]


def standard_property_names(sh_degree: int, lang_dim: int = 0, normals: bool = True) -> List[str]:
    """Property names of the standard 3DGS layout (+ lang_*)."""
    k = (sh_degree + 1) ** 2 - 1
    names = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals else [])
    names += [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(3 * k)] + ["opacity"]
    names += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    names += [f"lang_{i}" for i in range(lang_dim)]
    return names


_DC = ["f_dc_0", "f_dc_1", "f_dc_2"]
_REQUIRED = ["x", "y", "z"] + _DC + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
_KNOWN_FIXED = set(_REQUIRED) | {"nx", "ny", "nz"}
#: colour properties read (and written back) when a file has no f_dc_* (nerfstudio's ``ply_color_mode=rgb``)
_RGB_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))


def _rgb_names(names: Sequence[str]) -> Optional[Tuple[str, str, str]]:
    for cn in _RGB_NAMES:
        if all(c in names for c in cn):
            return cn
    return None


def _colour_scale(dtype) -> float:
    """What a stored colour is divided by to be in [0, 1]: 255 (uchar), 65535 (ushort), 1 (float)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return 65535.0 if dtype.itemsize >= 2 else 255.0
    return 1.0


def _rgb_values(data, cn) -> np.ndarray:
    """Colours [N, 3] float32 in [0, 1] from the properties ``cn`` (integer: /255 or /65535;
    float: as is, or /255 when they go above 1, as some tools store 0..255 floats)."""
    cols = np.stack([np.asarray(data[c]) for c in cn], 1)
    rgb = cols.astype(np.float32) / np.float32(_colour_scale(cols.dtype))
    if not np.issubdtype(cols.dtype, np.integer) and rgb.size and np.nanmax(rgb) > 1.0 + 1e-6:
        rgb = rgb / np.float32(255.0)
    return rgb


def _read_plydata(path: Path):
    from plyfile import PlyData

    if not path.exists():
        raise FileNotFoundError(f"PLY file not found: {path}")
    try:
        return PlyData.read(str(path), mmap=False)
    except Exception as e:  # plyfile raises several types for malformed files
        raise PlyError(f"{path}: not a readable PLY file ({type(e).__name__}: {e})") from None


def _numbered(names: Sequence[str], prefix: str) -> List[str]:
    """Names ``prefix<int>`` sorted by their integer suffix."""
    out = []
    for n in names:
        if n.startswith(prefix) and n[len(prefix):].isdigit():
            out.append((int(n[len(prefix):]), n))
    out.sort()
    return [n for _, n in out]


def _check_contiguous(path, names: List[str], prefix: str) -> int:
    if names and [int(n[len(prefix):]) for n in names] != list(range(len(names))):
        raise PlyError(f"{path}: properties {prefix}* are not numbered 0..{len(names) - 1}: {names}")
    return len(names)


def read_ply(path: PathLike, *, device: Union[str, torch.device] = "cpu", requires_grad: bool = True,
             return_layout: bool = False):
    """Read a 3DGS PLY (standard, gsplat, SuperSplat or compressed layout) into
    :class:`~langfield.scene.Gaussians` (raw values, float32; ``lang`` from ``lang_*``).

    A plain point cloud (x y z [+ colours], no Gaussian properties) raises :class:`PlyError`
    suggesting :func:`read_points_ply` and ``Gaussians.from_points``.
    """
    from plyfile import PlyListProperty

    path = Path(path)
    ply = _read_plydata(path)
    names_el = [el.name for el in ply.elements]
    if "vertex" not in names_el:
        raise PlyError(f"{path}: no 'vertex' element (elements: {names_el}); not a Gaussian splatting PLY")
    v = ply["vertex"]
    data = v.data
    names = list(data.dtype.names or ())
    if "chunk" in names_el and "packed_position" in names:
        g = _read_compressed(path, ply, requires_grad)
        g = g.to(device)
        return (g, None) if return_layout else g
    list_props = [p.name for p in v.properties if isinstance(p, PlyListProperty)]
    rgb_names = _rgb_names(names) if not all(k in names for k in _DC) else None
    missing = [k for k in _REQUIRED if k not in names and not (rgb_names and k in _DC)]
    if missing:
        if all(k in names for k in ("x", "y", "z")) and not any(k in names for k in _REQUIRED[3:]):
            raise PlyError(
                f"{path}: a plain point cloud (properties {', '.join(names)}), not a 3D Gaussian splatting PLY: "
                f"missing {', '.join(missing)}. To initialise Gaussians from these points use "
                f"langfield.io.read_points_ply(path) and Gaussians.from_points(xyz, rgb).")
        raise PlyError(f"{path}: not a 3D Gaussian splatting PLY: vertex properties {names} lack {', '.join(missing)}")
    bad_type = [k for k in _REQUIRED if k in list_props]
    if bad_type:
        raise PlyError(f"{path}: vertex properties {bad_type} are lists, not scalars")
    n = len(data)
    rest = _numbered(names, "f_rest_")
    nrest = _check_contiguous(path, rest, "f_rest_")
    if nrest % 3:
        raise PlyError(f"{path}: {nrest} f_rest_* properties is not a multiple of 3")
    try:
        sh_degree_from_bases(1 + nrest // 3)
    except ValueError:
        raise PlyError(f"{path}: {nrest} f_rest_* properties do not match any SH degree "
                       f"(degree 0-3 have 0, 9, 24, 45)") from None
    lang_names = _numbered(names, "lang_")
    nlang = _check_contiguous(path, lang_names, "lang_")

    def cols(ns):
        if not ns:
            return np.zeros((n, 0), dtype=np.float32)
        return np.stack([np.asarray(data[k], dtype=np.float32) for k in ns], axis=1)

    means = cols(["x", "y", "z"])
    if rgb_names:  # colours instead of the DC SH term (nerfstudio's rgb export)
        sh0 = ((_rgb_values(data, rgb_names) - np.float32(0.5)) / np.float32(SH_C0)).reshape(n, 1, 3)
    else:
        sh0 = cols(_DC).reshape(n, 1, 3)
    k1 = nrest // 3
    shN = cols(rest).reshape(n, 3, k1).transpose(0, 2, 1)  # channel-major -> [N, K-1, 3]
    opac = np.asarray(data["opacity"], dtype=np.float32).reshape(n)
    scales = cols(["scale_0", "scale_1", "scale_2"])
    quats = cols(["rot_0", "rot_1", "rot_2", "rot_3"])
    lang = cols(lang_names) if nlang else None
    bad = np.isnan(opac)  # an infinite logit opacity is a valid (fully opaque / transparent) Gaussian
    for a in (means, sh0.reshape(n, 3), shN.reshape(n, 3 * k1), scales, quats, lang):
        if a is not None:
            bad |= ~np.isfinite(a).all(1)
    if bad.any():
        warnings.warn(f"{path}: {int(bad.sum())} of {n} Gaussians have NaN or infinite values (read as they are; "
                      f"the first is vertex {int(np.argmax(bad))})", stacklevel=2)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    g = Gaussians(t(means), t(quats), t(scales), t(opac), t(sh0), t(shN), t(lang) if lang is not None else None,
                  requires_grad=requires_grad, copy=False)
    if not return_layout:
        return g
    known = _KNOWN_FIXED | set(rest) | set(lang_names) | set(rgb_names or ())
    if list_props:
        warnings.warn(f"{path}: the layout does not keep the vertex list properties {list_props}", stacklevel=2)
    unknown = [k for k in names if k not in known and k not in list_props]
    extra = None
    if unknown:
        extra = np.empty(n, dtype=[(k, data.dtype[k]) for k in unknown])
        for k in unknown:
            extra[k] = data[k]
    props = [(p.name, p.val_dtype) for p in v.properties if p.name not in list_props]
    layout = PlyLayout(properties=[(nm, np.dtype(dt).str.lstrip("<>|=")) for nm, dt in props],
                       comments=list(ply.comments), obj_info=list(ply.obj_info),
                       byte_order="<" if ply.byte_order in ("<", "=") else ply.byte_order, text=bool(ply.text),
                       extra=extra)
    return g, layout


def _values_by_name(g, normals: bool) -> dict:
    n = g.num
    d = {}
    means = g.means.detach().cpu().float().numpy()
    for i, c in enumerate("xyz"):
        d[c] = means[:, i]
    zeros = np.zeros(n, dtype=np.float32)
    for c in ("nx", "ny", "nz"):
        d[c] = zeros
    sh0 = g.sh0.detach().cpu().float().numpy().reshape(n, 3)
    for i in range(3):
        d[f"f_dc_{i}"] = sh0[:, i]
    rgb = sh0 * np.float32(SH_C0) + np.float32(0.5)  # for layouts with colours instead of f_dc_*
    for cn in _RGB_NAMES:
        for i, c in enumerate(cn):
            d[c] = rgb[:, i]
    shN = g.shN.detach().cpu().float().numpy()  # [N, K-1, 3]
    rest = shN.transpose(0, 2, 1).reshape(n, 3 * shN.shape[1])  # channel-major
    for i in range(rest.shape[1]):
        d[f"f_rest_{i}"] = rest[:, i]
    d["opacity"] = g.opacities.detach().cpu().float().numpy().reshape(n)
    sc = g.scales.detach().cpu().float().numpy()
    for i in range(3):
        d[f"scale_{i}"] = sc[:, i]
    q = g.quats.detach().cpu().float().numpy()
    for i in range(4):
        d[f"rot_{i}"] = q[:, i]
    if g.lang is not None:
        la = g.lang.detach().cpu().float().numpy()
        for i in range(la.shape[1]):
            d[f"lang_{i}"] = la[:, i]
    return d


def write_ply(path: PathLike, gaussians, *, layout: Union[None, str, PlyLayout] = None, lang: bool = True,
              comments: Sequence[str] = ()) -> None:
    """Write ``gaussians`` as a binary little-endian 3DGS PLY, atomically.

    ``layout``: None or ``"standard"`` (the original 3DGS layout, normals zero, + ``lang_*``
    when present and ``lang``), ``"gsplat"`` (gsplat's exporter: no normals), or a
    :class:`PlyLayout` from ``read_ply(..., return_layout=True)`` to reproduce a file's layout
    (its unknown extra properties are written back if the number of Gaussians is unchanged).
    Values are written as float32 (lossless for langfield's float32 parameters).
    """
    from plyfile import PlyData, PlyElement

    path = Path(path)
    g = gaussians
    deg, L = g.sh_degree, (g.lang_dim if lang else 0)
    byte_order, text, obj_info, cmts = "<", False, [], list(comments)
    extra = None
    if layout is None or layout == "standard":
        props = [(nm, "f4") for nm in standard_property_names(deg, L, normals=True)]
    elif layout == "gsplat":
        props = [(nm, "f4") for nm in standard_property_names(deg, L, normals=False)]
    elif isinstance(layout, PlyLayout):
        want = set(standard_property_names(deg, L, normals=False))
        extra_names = set(layout.extra.dtype.names) if layout.extra is not None else set()
        rgb_names = None if all(k in layout.names for k in _DC) else _rgb_names(
            [nm for nm in layout.names if nm not in extra_names])
        props = [(nm, dt) for nm, dt in layout.properties
                 if nm in want or nm in ("nx", "ny", "nz") or nm in extra_names or (rgb_names and nm in rgb_names)]
        have = {nm for nm, _ in props}
        props += [(nm, "f4") for nm in standard_property_names(deg, L, normals=False)
                  if nm not in have and not (rgb_names and nm in _DC)]
        byte_order, text = layout.byte_order, layout.text
        cmts = list(layout.comments) + cmts
        obj_info = list(layout.obj_info)
        extra = layout.extra
        if extra is not None and len(extra) != g.num:
            warnings.warn(f"dropping extra PLY properties {extra.dtype.names}: the number of Gaussians changed "
                          f"({len(extra)} -> {g.num})", stacklevel=2)
            props = [(nm, dt) for nm, dt in props if nm not in extra.dtype.names]
            extra = None
    else:
        raise ValueError(f"layout must be None, 'standard', 'gsplat' or a PlyLayout, got {layout!r}")
    vals = _values_by_name(g, normals=True)
    arr = np.empty(g.num, dtype=[(nm, byte_order + dt if dt not in ("u1", "i1") else dt) for nm, dt in props])
    for nm, dt in props:
        if extra is not None and nm in extra.dtype.names:
            arr[nm] = extra[nm]
        elif any(nm in cn for cn in _RGB_NAMES) and np.issubdtype(np.dtype(dt), np.integer):
            scale = _colour_scale(dt)
            arr[nm] = np.round(np.clip(vals[nm], 0, 1) * scale)
        else:
            arr[nm] = vals[nm]
    el = PlyElement.describe(arr, "vertex")
    ply = PlyData([el], text=text, byte_order=byte_order, comments=cmts, obj_info=obj_info)
    _atomic_write(path, ply.write)


def _atomic_write(path: Path, write_fn) -> None:
    from langfield.io.checkpoint import atomic_write  # one atomic writer for all of langfield.io

    atomic_write(Path(path), write_fn)


# ------------------------------------------------------------------------------------------
# Plain point clouds

def read_points_ply(path: PathLike) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Points of a PLY point cloud (or of a Gaussian PLY): ``(xyz float32 [N, 3],
    rgb float32 [N, 3] in [0, 1] or None)``. Colours come from ``red green blue`` (uchar:
    /255, float: as is) or, for Gaussian files, from the DC SH term. Raises :class:`PlyError`
    for a file without points (naming it)."""
    path = Path(path)
    ply = _read_plydata(path)
    if "vertex" not in [el.name for el in ply.elements]:
        raise PlyError(f"{path}: no 'vertex' element; not a point cloud")
    data = ply["vertex"].data
    names = list(data.dtype.names or ())
    if "chunk" in [el.name for el in ply.elements] and "packed_position" in names:  # compressed Gaussians
        g = _read_compressed(path, ply, requires_grad=False)
        xyz, rgb = g.means.numpy(), np.clip(g.sh0.numpy()[:, 0] * SH_C0 + 0.5, 0, 1).astype(np.float32)
    else:
        if not all(c in names for c in ("x", "y", "z")):
            raise PlyError(f"{path}: vertex element has no x, y, z properties (has {names})")
        xyz = np.stack([np.asarray(data[c], dtype=np.float32) for c in ("x", "y", "z")], 1)
        rgb = None
        cn = _rgb_names(names)
        if cn is not None:
            rgb = _rgb_values(data, cn)
        elif all(f"f_dc_{i}" in names for i in range(3)):
            rgb = np.clip(np.stack([np.asarray(data[f"f_dc_{i}"], dtype=np.float32) for i in range(3)], 1) * SH_C0
                          + 0.5, 0, 1)
    ok = np.isfinite(xyz).all(1)
    if not ok.all():
        warnings.warn(f"{path}: skipping {int((~ok).sum())} of {len(xyz)} points with NaN or infinite coordinates",
                      stacklevel=2)
        xyz, rgb = xyz[ok], (rgb[ok] if rgb is not None else None)
    if len(xyz) == 0:
        raise PlyError(f"{path}: empty point cloud (0 vertices" + (" with finite coordinates)" if len(ok) else ")"))
    if rgb is not None:
        rgb = np.clip(np.nan_to_num(rgb, nan=0.5), 0, 1).astype(np.float32)
    return xyz, rgb


def write_points_ply(path: PathLike, xyz, rgb=None) -> None:
    """Binary PLY point cloud: ``x y z`` float32 [+ ``red green blue`` uchar from [0, 1] or uint8]."""
    from plyfile import PlyData, PlyElement

    xyz = np.asarray(xyz, dtype=np.float32)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8:
            rgb = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    arr = np.empty(len(xyz), dtype=fields)
    arr["x"], arr["y"], arr["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if rgb is not None:
        arr["red"], arr["green"], arr["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    _atomic_write(Path(path), PlyData([PlyElement.describe(arr, "vertex")], byte_order="<").write)


# ------------------------------------------------------------------------------------------
# Compressed PLY (PlayCanvas / SuperSplat, gsplat "ply_compressed")

_COMPRESSED_VERTEX = ["packed_position", "packed_rotation", "packed_scale", "packed_color"]
_COMPRESSED_CHUNK = [f"{m}_{a}" for m in ("min", "max") for a in "xyz"] + \
    [f"{m}_scale_{a}" for m in ("min", "max") for a in "xyz"]


def _unpack_unorm(v: np.ndarray, bits: int) -> np.ndarray:
    return (v & ((1 << bits) - 1)).astype(np.float32) / float((1 << bits) - 1)


def _unpack_111011(v: np.ndarray) -> np.ndarray:
    return np.stack([_unpack_unorm(v >> 21, 11), _unpack_unorm(v >> 11, 10), _unpack_unorm(v, 11)], 1)


def _read_compressed(path: Path, ply, requires_grad: bool):
    try:
        chunk = ply["chunk"].data
        vert = ply["vertex"].data
        lack = [k for k in _COMPRESSED_VERTEX if k not in vert.dtype.names]
        lack += [k for k in _COMPRESSED_CHUNK if k not in chunk.dtype.names]
        if lack:
            raise PlyError(f"{path}: compressed Gaussian PLY without the properties {', '.join(lack)}")
        n = len(vert)
        nchunk = len(chunk)
        cidx = np.arange(n) // 256
        if nchunk * 256 < n:
            raise PlyError(f"{path}: compressed PLY has {nchunk} chunks for {n} splats (256 per chunk)")

        def cvec(names):
            return np.stack([np.asarray(chunk[k], dtype=np.float32) for k in names], 1)[cidx]

        lo = cvec(["min_x", "min_y", "min_z"])
        hi = cvec(["max_x", "max_y", "max_z"])
        pos = _unpack_111011(np.asarray(vert["packed_position"], dtype=np.uint32))
        means = lo + pos * (hi - lo)
        slo = cvec(["min_scale_x", "min_scale_y", "min_scale_z"])
        shi = cvec(["max_scale_x", "max_scale_y", "max_scale_z"])
        scales = slo + _unpack_111011(np.asarray(vert["packed_scale"], dtype=np.uint32)) * (shi - slo)
        pc = np.asarray(vert["packed_color"], dtype=np.uint32)
        col = np.stack([_unpack_unorm(pc >> 24, 8), _unpack_unorm(pc >> 16, 8), _unpack_unorm(pc >> 8, 8),
                        _unpack_unorm(pc, 8)], 1)
        cnames = ["min_r", "min_g", "min_b", "max_r", "max_g", "max_b"]
        if all(k in chunk.dtype.names for k in cnames):
            clo, chi = cvec(cnames[:3]), cvec(cnames[3:])
            rgb = clo + col[:, :3] * (chi - clo)
        else:
            rgb = col[:, :3]
        sh0 = ((rgb - 0.5) / SH_C0).reshape(n, 1, 3)
        op = np.clip(col[:, 3], 1e-6, 1 - 1e-6)
        opac = np.log(op / (1 - op)).astype(np.float32)
        pr = np.asarray(vert["packed_rotation"], dtype=np.uint32)
        largest = (pr >> 30).astype(np.int64)
        norm = np.sqrt(2.0) * 0.5
        abc = np.stack([_unpack_unorm(pr >> 20, 10), _unpack_unorm(pr >> 10, 10), _unpack_unorm(pr, 10)], 1)
        abc = (abc - 0.5) / norm
        m = np.sqrt(np.clip(1.0 - (abc ** 2).sum(1), 0, None))
        quats = np.zeros((n, 4), dtype=np.float32)
        for i in range(4):
            sel = largest == i
            others = [j for j in range(4) if j != i]
            quats[sel, i] = m[sel]
            for k, j in enumerate(others):
                quats[sel, j] = abc[sel, k]
        if "sh" in [el.name for el in ply.elements]:
            sh = ply["sh"].data
            rest = _numbered(list(sh.dtype.names), "f_rest_")
            nrest = _check_contiguous(path, rest, "f_rest_")
            if len(sh) != n:
                raise PlyError(f"{path}: compressed PLY has {len(sh)} 'sh' rows for {n} splats")
            if nrest not in (0, 9, 24, 45):
                raise PlyError(f"{path}: {nrest} f_rest_* properties in the 'sh' element do not match any SH degree "
                               f"(degree 1-3 have 9, 24, 45)")
            q = np.stack([np.asarray(sh[k], dtype=np.float32) for k in rest], 1) if rest else np.zeros((n, 0))
            # uchar -> [-4, 4] as PlayCanvas' reader: (v + 0.5) / 256, with 0 and 255 mapped to the ends
            u = np.where(q == 0, 0.0, np.where(q == 255, 1.0, (q + 0.5) / 256.0))
            vals = ((u - 0.5) * 8.0).astype(np.float32)
            k1 = nrest // 3
            shN = vals.reshape(n, 3, k1).transpose(0, 2, 1)
        else:
            shN = np.zeros((n, 0, 3), dtype=np.float32)
    except (KeyError, ValueError) as e:
        if isinstance(e, PlyError):
            raise
        raise PlyError(f"{path}: unreadable compressed Gaussian PLY ({e})") from None

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return Gaussians(t(means), t(quats), t(scales), t(opac), t(sh0), t(shN), requires_grad=requires_grad, copy=False)
