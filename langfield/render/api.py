"""``rasterization(...)``: gsplat 1.5.3's call, on langfield's own renderer.

Backends: "cpu" and "cuda" (the native library, cuda/), "torch" (the pure-torch
reference, render/reference.py), "gsplat" (gsplat's CUDA rasterizer, for
comparisons), "auto" (native for the tensors' device when it builds, else
torch, with one warning).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["rasterization", "RENDER_MODES", "BACKENDS", "resolve_backend"]

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
BACKENDS = ("auto", "cpu", "cuda", "torch", "gsplat")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, needs_features: bool = False) -> str:
    """The concrete backend ("cpu", "cuda", "torch" or "gsplat") for a request.

    "auto": the native library of the device when it builds and has not failed its self-test
    (render/selftest.py: run once per CUDA device and library, result cached in memory and next
    to the library); after a failed self-test, "gsplat" when gsplat's rasterizer is installed,
    already built and passes the same test (never with ``needs_features``: it cannot render
    ``features=``), else "torch". Float64 and other dtypes: "torch". An explicit "cuda" runs the
    self-test too (a failure warns) but stays "cuda".
    """
    from langfield.render._build import native_available

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if dtype != torch.float32:
            return "torch"  # the native library is float32
        kind = "cuda" if device.type == "cuda" else "cpu"
        if not native_available(kind):
            return "torch"
        from langfield.render import selftest

        res = selftest._results.get((kind, str(device)), _UNSET) if device.type == "cpu" else _UNSET
        if res is _UNSET:  # not yet looked up in this process (always for CUDA: the key needs the index)
            res = selftest.ensure_selftest(kind, device)
        if res is not None and not res.passed:
            return selftest.fallback_backend(device, needs_features)
        return kind
    if backend in ("cpu", "cuda"):
        if (backend == "cuda") != (device.type == "cuda"):
            raise ValueError(f"backend={backend!r} needs tensors on {'a CUDA device' if backend == 'cuda' else 'the CPU'},"
                             f" got {device}")
        if dtype != torch.float32:
            raise ValueError(f"backend={backend!r} needs float32 tensors, got {dtype}")
        from langfield.render._build import load_library

        load_library(backend)  # raises NativeBuildError with the compiler's output
        if backend == "cuda":
            from langfield.render.selftest import ensure_selftest

            ensure_selftest("cuda", device)  # a failure warns; the user asked for CUDA, so it stays
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError("backend='gsplat' needs CUDA tensors (gsplat's rasterizer is CUDA-only)")
    return backend


_UNSET = object()


def backend_ops(backend: str):
    """The op module (native or torch reference) of a concrete backend."""
    return _ops(backend)


def _ops(backend: str):
    if backend in ("cpu", "cuda"):
        from langfield.render import native

        return native
    from langfield.render import reference

    return reference


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                  backgrounds, check_finite: bool = True) -> Tuple[int, int]:
    def fail(msg):
        raise ValueError(f"rasterization: {msg}")

    tensors = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                   viewmats=viewmats, Ks=Ks)
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {t.dtype}")
    dev = means.device
    for name, t in tensors.items():
        if t.device != dev:
            fail(f"{name} is on {t.device} but means is on {dev}: put all inputs on one device")
    if means.dim() != 2 or means.shape[-1] != 3:
        fail(f"means must be [N, 3], got {list(means.shape)}")
    N = means.shape[0]
    if quats.shape != (N, 4):
        fail(f"quats must be [N, 4] = [{N}, 4] (wxyz), got {list(quats.shape)}")
    if scales.shape != (N, 3):
        fail(f"scales must be [N, 3] = [{N}, 3], got {list(scales.shape)}")
    if opacities.shape != (N,):
        fail(f"opacities must be [N] = [{N}], got {list(opacities.shape)}")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        fail(f"viewmats must be [C, 4, 4], got {list(viewmats.shape)}")
    C = viewmats.shape[0]
    if Ks.shape != (C, 3, 3):
        fail(f"Ks must be [C, 3, 3] = [{C}, 3, 3], got {list(Ks.shape)}")
    if sh_degree is None:
        if not (colors.dim() == 2 and colors.shape[0] == N) and not (colors.dim() == 3 and colors.shape[:2] == (C, N)):
            fail(f"colors must be [N, D] or [C, N, D] with N={N}, C={C}, got {list(colors.shape)}")
        if colors.shape[-1] < 1:
            fail("colors must have at least one channel")
    else:
        if not 0 <= int(sh_degree) <= 3:
            fail(f"sh_degree must be 0..3, got {sh_degree}")
        ok = (colors.dim() == 3 and colors.shape[0] == N) or (colors.dim() == 4 and colors.shape[:2] == (C, N))
        if not ok or colors.shape[-1] != 3:
            fail(f"with sh_degree, colors must be [N, K, 3] or [C, N, K, 3], got {list(colors.shape)}")
        if colors.shape[-2] < (int(sh_degree) + 1) ** 2:
            fail(f"sh_degree={sh_degree} needs K >= {(int(sh_degree) + 1) ** 2} coefficients, got {colors.shape[-2]}")
    if isinstance(width, bool) or isinstance(height, bool) or int(width) != width or int(height) != height:
        fail(f"width and height must be integers, got {width!r}, {height!r}")
    if width < 1 or height < 1:
        fail(f"width and height must be >= 1, got {width}x{height}")
    if width * height > 2**31 // 4:
        fail(f"image {width}x{height} is too large")
    if not check_finite:
        return C, N
    if dev.type == "cpu":
        counts = [_count_nonfinite(t) for t in tensors.values()]
    else:  # one device-to-host transfer for all inputs
        counts = torch.stack([(~torch.isfinite(t)).sum() for t in tensors.values()]).tolist()
    for name, bad in zip(tensors, counts):
        if bad:
            fail(f"{name} has {int(bad)} non-finite value(s) (NaN or Inf)")
    return C, N


def _count_nonfinite(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous():
        # one scan in native code: torch's threaded ops cost milliseconds each on
        # a busy machine, which adds up to more than the render itself
        from langfield.render._build import native_available

        if native_available("cpu", warn=False):
            import ctypes

            from langfield.render._build import load_library

            return int(load_library("cpu").lf_cpu_count_nonfinite(ctypes.c_void_p(t.data_ptr()), t.numel()))
    return int((~torch.isfinite(t)).sum())


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    absgrad: bool = False,
    backend: str = "auto",
    camera_model: str = "pinhole",
    features: Optional[Tensor] = None,
    validate: bool = True,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render C views of N Gaussians; gsplat 1.5.3's arguments and conventions.

    Args:
        means [N,3], quats [N,4] (wxyz), scales [N,3] (activated), opacities [N] (in [0,1]).
        colors: [N,D] or [C,N,D] features of any D >= 1, or SH coefficients [N,K,3] / [C,N,K,3]
            with ``sh_degree`` (colours are then clamp_min(SH + 0.5, 0), as in gsplat).
        viewmats [C,4,4] world-to-camera (OpenCV: +z forward), Ks [C,3,3].
        render_mode: "RGB" (the D channels), "D" (accumulated depth), "ED" (expected depth,
            divided by alpha), "RGB+D", "RGB+ED": depth is appended as the last channel.
        rasterize_mode: "classic" or "antialiased" (opacity times the EWA compensation).
        absgrad: after backward, ``meta["means2d"].absgrad`` holds the absolute screen gradient.
        backend: "auto", "cpu", "cuda", "torch" or "gsplat".
        packed: accepted for compatibility; langfield always renders unpacked.
        features: langfield extension: extra per-Gaussian channels [N,F] or [C,N,F] (language
            latents, ...) rendered in the same pass, appended after the colours (after the
            SH-evaluated RGB with ``sh_degree``) and before a depth channel; their background
            is 0. Sorting and tile work are shared with the colours.
        validate: langfield extension: ``False`` skips the scan for non-finite inputs on CUDA
            tensors (it costs a device synchronisation per call; the trainers check their loss
            instead). Shapes are always checked; on the CPU the scan is one cheap native pass
            that also protects the native kernels, so it always runs there.

    Returns:
        renders [C,H,W,D'], alphas [C,H,W,1], meta (radii [C,N,2], means2d [C,N,2] whose .grad is
        the screen-space gradient, depths, conics, tile data, last_ids [C,H,W] = index of the
        last Gaussian blended at each pixel or -1, width, height, n_cameras, ...).
    """
    if render_mode not in RENDER_MODES:
        raise ValueError(f"rasterization: render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterization: rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")
    if camera_model != "pinhole":
        raise ValueError(f"rasterization: only camera_model='pinhole' is supported, got {camera_model!r}")
    if not 1 <= int(tile_size) <= 32:
        raise ValueError(f"rasterization: tile_size must be in 1..32, got {tile_size}")
    C, N = _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
                         backgrounds, check_finite=validate or means.device.type == "cpu")
    width, height = int(width), int(height)
    if backgrounds is not None:
        D_expected = 3 if sh_degree is not None else colors.shape[-1]
        if backgrounds.dim() == 1:
            backgrounds = backgrounds.expand(C, -1)
        if backgrounds.shape != (C, D_expected):
            raise ValueError(f"rasterization: backgrounds must be [C, D] = [{C}, {D_expected}], "
                             f"got {list(backgrounds.shape)}")
        if render_mode in ("D", "ED"):
            backgrounds = None
    if features is not None:
        ok = (features.dim() == 2 and features.shape[0] == N) or (features.dim() == 3 and features.shape[:2] == (C, N))
        if not ok or features.shape[-1] < 1:
            raise ValueError(f"rasterization: features must be [N, F] or [C, N, F] with N={N}, C={C}, F >= 1, "
                             f"got {list(features.shape)}")
        if features.device != means.device:
            raise ValueError(f"rasterization: features are on {features.device}, means on {means.device}")
    be = resolve_backend(backend, means.device, means.dtype, needs_features=features is not None)
    if be == "gsplat" and features is not None:
        raise ValueError("rasterization: the gsplat backend cannot render extra features in the colour pass; "
                         "use backend='auto' (langfield's renderer) or render them separately")
    if be == "gsplat":
        return _gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane,
                       far_plane, radius_clip, eps2d, sh_degree, tile_size, backgrounds, render_mode,
                       rasterize_mode, absgrad)
    ops = _ops(be)
    dtype = means.dtype if be == "torch" else torch.float32
    cast = (lambda t: t) if be == "torch" else (lambda t: t.to(torch.float32))
    means, quats, scales, opacities, colors, viewmats, Ks = (
        cast(t) for t in (means, quats, scales, opacities, colors, viewmats, Ks))
    if backgrounds is not None:
        backgrounds = cast(backgrounds)

    antialiased = rasterize_mode == "antialiased"
    radii, means2d, depths, conics, comps = ops.project(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
        radius_clip, antialiased)
    visible = (radii > 0).all(dim=-1)  # [C,N]

    opac = opacities.unsqueeze(0).expand(C, N)
    if antialiased:
        opac = opac * comps

    if sh_degree is not None:
        coeffs = colors if colors.dim() == 4 else colors.unsqueeze(0).expand(C, *colors.shape)
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C,3]
        dirs = means.unsqueeze(0) - campos.unsqueeze(1)  # [C,N,3]
        feats = ops.sh(int(sh_degree), dirs, coeffs, visible)
        feats = torch.clamp_min(feats + 0.5, 0.0)
    else:
        feats = colors if colors.dim() == 3 else colors.unsqueeze(0).expand(C, *colors.shape)

    if features is not None:
        if render_mode in ("D", "ED"):
            raise ValueError("rasterization: features need a render_mode with colours (RGB, RGB+D, RGB+ED)")
        extra = cast(features)
        if extra.dim() == 2:
            extra = extra.unsqueeze(0).expand(C, *extra.shape)
        feats = torch.cat([feats, extra.to(feats.dtype)], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, extra.shape[-1])], dim=-1)

    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths.unsqueeze(-1)], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depths.unsqueeze(-1)

    tile_size = int(tile_size)
    tile_offsets, flatten_ids, isect_ids = ops.isect(radii, means2d, depths, width, height, tile_size)
    renders, alphas, last_isect = ops.rasterize(
        means2d, conics, feats.contiguous(), opac.contiguous(), backgrounds, width, height, tile_size,
        tile_offsets, flatten_ids, absgrad)

    if render_mode in ("ED", "RGB+ED"):
        renders = torch.cat([renders[..., :-1], renders[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)

    with torch.no_grad():
        if flatten_ids.numel():
            gid = torch.where(last_isect >= 0, flatten_ids.long()[last_isect.clamp(min=0).long()] % max(N, 1),
                              torch.full_like(last_isect, -1, dtype=torch.long))
        else:
            gid = torch.full(last_isect.shape, -1, dtype=torch.long, device=last_isect.device)
    meta: Dict[str, Any] = {
        "backend": be,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opac,
        "tile_width": math.ceil(width / tile_size),
        "tile_height": math.ceil(height / tile_size),
        "tiles_per_gauss": None,
        "isect_ids": isect_ids,
        "flatten_ids": flatten_ids,
        "isect_offsets": tile_offsets,
        "last_ids": gid,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": C,
    }
    if comps is not None:
        meta["compensations"] = comps
    return renders, alphas, meta


def _gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
            radius_clip, eps2d, sh_degree, tile_size, backgrounds, render_mode, rasterize_mode, absgrad):
    try:
        import gsplat
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("backend='gsplat' needs the gsplat package (pip install gsplat==1.5.3)") from e
    renders, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d, sh_degree=sh_degree, packed=False,
        tile_size=tile_size, backgrounds=backgrounds, render_mode=render_mode, rasterize_mode=rasterize_mode,
        absgrad=absgrad)
    meta["backend"] = "gsplat"
    return renders, alphas, meta
