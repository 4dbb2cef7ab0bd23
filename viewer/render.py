"""The viewer's engine, independent of viser: camera conversion, frames for every mode, and the
per-client render worker (newest camera wins, lower resolution while the camera moves, full
resolution at rest, stale renders abandoned).

* :func:`camera_from_viser` / :func:`viser_pose_of` convert between viser's camera (pose
  ``T_world_camera`` as ``wxyz`` + ``position``, OpenCV axes, vertical ``fov`` in radians) and
  langfield's (``viewmat`` world-to-camera + pinhole ``K``).
* :class:`FrameRenderer` turns one camera + :class:`Settings` into an ``[H, W, 3]`` uint8 image:
  RGB, depth, PCA of the language features, relevancy heatmap over RGB, query mask, with the
  Gaussians selected in 3D highlighted. Everything a frame needs comes out of **one**
  rasterizer pass (colours, expected depth, and as extra channels whatever the mode needs:
  the latents of every level, per-Gaussian relevancy, per-Gaussian PCA colours, the 3D
  selection).
* :class:`RenderWorker` is the thread that serves one client.

Two ways to a relevancy map (both LERF relevancy, then :func:`langfield.query.result_from_maps`):

* **exact** (LangSplat's): the rendered latent map is decoded pixel by pixel. Used at rest. The
  decode is bounded by ``exact_budget`` decoded rows per frame (the maps are averaged over
  ``stride x stride`` blocks when a frame has more pixels than that, as
  :func:`langfield.query.relevancy_maps` does) and is done in bands, so a camera move abandons
  it within one band.
* **fast**: each Gaussian's latent is decoded once per query (cached), and its relevancy is
  rendered as an extra channel, normalised by alpha. Used while the camera moves, and always
  when ``exact_budget`` is 0. Cheap per frame (one channel per level in the same pass).

A **codebook** field (sparse coefficients over a global codebook, no decoder) takes neither:
its relevancy frames come from :meth:`LanguageField.render_query` (``path == "fused"``): colour,
alpha and every level's relevancy in one sparse pass, exactly the numbers of
``field.query(field.render(...), text)``, at rest and in motion.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from langfield.maths import quat_to_rotmat_np, rotmat_to_quat_np

__all__ = ["MODES", "MODE_LABELS", "MAX_QUERY_CHARS", "CameraState", "Settings", "Frame", "FrameRenderer",
           "RenderWorker", "Job", "FpsMeter", "camera_from_viser", "viser_pose_of", "wxyz_to_rotmat",
           "rotmat_to_wxyz", "fov_of", "scene_extent", "camera_target", "is_language_mode"]

MODES: Tuple[str, ...] = ("rgb", "depth", "pca", "relevancy", "mask")
MODE_LABELS: Dict[str, str] = {"rgb": "RGB", "depth": "depth", "pca": "PCA of language features",
                               "relevancy": "relevancy heatmap", "mask": "query mask"}
MAX_QUERY_CHARS = 300  # longer queries are cut (CLIP's tokenizer reads 77 tokens anyway)
HIGHLIGHT = (1.0, 0.15, 0.85)  # colour of the Gaussians selected in 3D
MASK_COLOR = (0.1, 1.0, 0.3)


def query_overlay(rgb: torch.Tensor, res, mode: str) -> torch.Tensor:
    """A query result drawn over the colour frame ``rgb [H, W, 3]``: the heatmap
    (``mode == "relevancy"``) or the mask in :data:`MASK_COLOR` over a darkened frame."""
    from langfield.query import heatmap_overlay

    if mode == "relevancy":
        return heatmap_overlay(rgb, res.heatmap, alpha=0.6)
    m = res.mask.to(rgb.device)[..., None]
    return torch.where(m, 0.45 * rgb + 0.55 * torch.tensor(MASK_COLOR, device=rgb.device), 0.3 * rgb)


def selection_overlay(out: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """The 3D selection's footprint (``coverage [H, W]`` in [0, 1]) tinted :data:`HIGHLIGHT`."""
    s = coverage.to(out.device).clamp(0, 1)[..., None] * 0.7
    return out * (1 - s) + s * torch.tensor(HIGHLIGHT, device=out.device)


def is_language_mode(mode: str) -> bool:
    return mode in ("pca", "relevancy", "mask")


# ------------------------------------------------------------------------------------------ cameras

wxyz_to_rotmat = quat_to_rotmat_np  # one copy of the maths (langfield.maths)
rotmat_to_wxyz = rotmat_to_quat_np


@dataclass(frozen=True)
class CameraState:
    """A client's camera as viser reports it: pose ``T_world_camera`` (OpenCV axes: +z forward,
    -y up), vertical field of view in radians, canvas size in pixels."""
    wxyz: Tuple[float, float, float, float]
    position: Tuple[float, float, float]
    fov: float
    width: int
    height: int

    @classmethod
    def from_handle(cls, cam) -> "CameraState":
        return cls(tuple(float(v) for v in cam.wxyz), tuple(float(v) for v in cam.position), float(cam.fov),
                   int(cam.image_width), int(cam.image_height))


def camera_from_viser(cam: CameraState, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(viewmat [4, 4] world-to-camera, K [3, 3])`` for an image of ``width x height``."""
    R = wxyz_to_rotmat(cam.wxyz)
    t = np.asarray(cam.position, dtype=np.float64)
    vm = np.eye(4)
    vm[:3, :3] = R.T
    vm[:3, 3] = -R.T @ t
    fov = min(max(float(cam.fov), 1e-3), math.pi - 1e-3)
    f = 0.5 * height / math.tan(0.5 * fov)
    K = np.array([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]])
    return vm, K


def fov_of(K, height: int) -> float:
    """Vertical field of view (radians) of a pinhole ``K`` for an image ``height`` pixels high."""
    return 2.0 * math.atan(0.5 * float(height) / float(np.asarray(K)[1, 1]))


def viser_pose_of(viewmat) -> Tuple[np.ndarray, np.ndarray]:
    """``(wxyz, position)`` of the camera-to-world pose of an OpenCV world-to-camera matrix."""
    vm = np.asarray(viewmat, dtype=np.float64)
    c2w = np.linalg.inv(vm)
    return rotmat_to_wxyz(c2w[:3, :3]), c2w[:3, 3].copy()


def camera_target(viewmat, K, height: int, center, radius: float):
    """How to put a viser camera exactly on a dataset camera: ``(fov, position, look_at, up)``
    (look_at on the optical axis, as far as ``center`` is along it)."""
    c2w = np.linalg.inv(np.asarray(viewmat, dtype=np.float64))
    pos, R = c2w[:3, 3], c2w[:3, :3]
    d = float(np.dot(np.asarray(center, dtype=np.float64) - pos, R[:, 2]))
    return fov_of(K, height), pos, pos + R[:, 2] * (d if d > 1e-3 else radius), -R[:, 1]


def scene_extent(means: torch.Tensor) -> Tuple[np.ndarray, float]:
    """A robust centre and radius of Gaussian centres (5th..95th percentiles)."""
    m = means.detach().float().cpu()
    if m.shape[0] == 0:
        return np.zeros(3), 1.0
    if m.shape[0] > 200_000:
        m = m[torch.randperm(m.shape[0], generator=torch.Generator().manual_seed(0))[:200_000]]
    lo, hi = torch.quantile(m, 0.05, dim=0), torch.quantile(m, 0.95, dim=0)
    c = ((lo + hi) / 2).numpy().astype(np.float64)
    r = float(torch.linalg.norm(hi - lo) / 2)
    return c, max(r, 1e-3)


# ------------------------------------------------------------------------------------------ settings / frames

@dataclass(frozen=True)
class Settings:
    """What a client wants to see (everything but the camera)."""
    mode: str = "rgb"
    query: str = ""
    level: str = "auto"
    threshold: float = 0.4
    select: bool = False  # highlight the Gaussians matching the query (3D selection)
    max_res: int = 640  # longest side of a frame at rest, pixels
    jpeg_quality: int = 85
    time: Optional[float] = None  # dynamic scenes: the time in [0, 1] shown (None: static / t = 0)


@dataclass
class Frame:
    image: np.ndarray  # [H, W, 3] uint8
    width: int
    height: int
    mode: str  # the mode actually drawn (rgb when a language mode cannot be)
    quality: str  # "rest" or "motion"
    message: str = ""  # for the user ("" when all is well)
    level: Optional[str] = None  # the level a query used
    path: str = ""  # "exact" or "fast" for queries
    selected: Optional[int] = None  # Gaussians selected in 3D
    seconds: float = 0.0
    viewmat: Optional[np.ndarray] = None
    time: Optional[float] = None  # the time drawn (dynamic scenes)
    K: Optional[np.ndarray] = None


class Cancelled(Exception):
    """A render abandoned because a newer request made it stale."""


class FrameRenderer:
    """Frames of a :class:`~langfield.field.LanguageField` (see the module docstring).

    ``exact_budget``: decoded rows per exact relevancy frame (0: always the fast path);
    default 150k on CPU (about 0.7 s with LangSplat's decoder on 2 cores), 4M on CUDA.
    Thread-safe: one instance serves every client (its caches are shared and locked)."""

    def __init__(self, field, *, exact_budget: Optional[int] = None, background: Optional[Sequence[float]] = None,
                 band_rows: int = 32768):
        self.field = field
        if exact_budget is None:
            exact_budget = 4_000_000 if field.device.type == "cuda" else 150_000
        self.exact_budget = int(exact_budget)
        self.band_rows = int(band_rows)
        if background is None:
            # the colour eval composites on: white for runs trained on white or random backgrounds
            # (RGBA data), black for black ones; a PLY without a run: black
            bg = (field.info or {}).get("background")
            background = (1.0, 1.0, 1.0) if bg in ("white", "random", (1, 1, 1), [1, 1, 1]) else (0.0, 0.0, 0.0)
        self.background = tuple(float(v) for v in background)
        self._lock = threading.Lock()
        self._gauss_rel: Dict[Tuple, Any] = {}  # (gid, text, level) -> (gaussians ref, scores [N])
        self._known_level: Dict[Tuple, int] = {}  # (gid, text) -> level the last exact frame chose
        self._pca: Dict[Tuple, Any] = {}  # (gid, level) -> (gaussians ref, colours [N, 3])

    # -- helpers ----------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the per-Gaussian caches (a new checkpoint replaced the Gaussians)."""
        with self._lock:
            self._gauss_rel.clear()
            self._pca.clear()
            self._known_level.clear()

    def snapshot(self):
        """The field's current Gaussians, levels, latent size, SH degree, decoder (consistent
        across a reload)."""
        f = self.field
        with f._lock:
            return f.gaussians, list(f.levels), int(f.latent_dim), int(f.sh_degree), f.decoder, f.has_language

    def language_problem(self) -> Optional[str]:
        """None when text queries work, else a message for the user."""
        from langfield.field import NoLanguageError

        try:
            self.field._require_language()
        except NoLanguageError as e:
            return str(e)
        return None

    @staticmethod
    def clean_query(text: str) -> Tuple[str, str]:
        """``(text to use, note)``: whitespace collapsed, cut at :data:`MAX_QUERY_CHARS`."""
        t = " ".join(str(text or "").split())
        if len(t) > MAX_QUERY_CHARS:
            return t[:MAX_QUERY_CHARS], f"query cut to its first {MAX_QUERY_CHARS} characters"
        return t, ""

    def _level_index(self, level: str, levels: List[str]) -> Optional[int]:
        if level in (None, "", "auto") or level not in levels:
            return None
        return levels.index(level)

    @staticmethod
    def is_dynamic(g) -> bool:
        """A scene model that changes over time (deformable Gaussians)."""
        return hasattr(g, "deform")

    @staticmethod
    def lang_of(g, t: Optional[float]) -> torch.Tensor:
        """The per-Gaussian latents of every level at time ``t``: the stored ones, plus for a
        dynamic model with time-sensitive states its ``state`` level at ``t``."""
        if getattr(g, "states", None) is not None:
            with torch.no_grad():
                return g.activated(0.0 if t is None else float(t)).lang.detach()
        return g.splats["lang"].detach()

    def _tkey(self, g, t: Optional[float]):
        return None if getattr(g, "states", None) is None else round(float(t or 0.0), 6)

    def _rasterize(self, g, sh_degree: int, viewmat, K, width: int, height: int, extra: Optional[torch.Tensor],
                   t: Optional[float] = None):
        from langfield.render.model import Cameras, render

        out = render(g, Cameras.of(viewmat, K, width, height, device=g.device), t=t, sh_degree=sh_degree, extra=extra,
                     depth=True, background=self.background, backend=self.field.backend)
        ex = out.extra[0] if extra is not None else None
        return out.rgb[0].clamp(0, 1), out.depth[0], out.alpha[0], ex

    @torch.no_grad()
    def level_scores(self, g, text: str, li: int, t: Optional[float] = None) -> torch.Tensor:
        """Each Gaussian's relevancy ``[N]`` to ``text`` at level ``li`` (its latent decoded),
        cached per Gaussians, text and level (and time, for time-sensitive latents)."""
        key = (id(g), text, int(li), self._tkey(g, t))
        with self._lock:
            hit = self._gauss_rel.get(key)
            if hit is not None and hit[0] is g:
                return hit[1]
        from langfield.query import select_gaussians

        f = self.field
        with f._lock:
            decoder, nl = f.decoder, len(f.levels)
        tq = f.text_query
        scores = select_gaussians(self.lang_of(g, t), decoder, tq.embed(text), tq.canon, level=int(li),
                                  n_levels=nl).scores  # scores only: the threshold is applied by the caller
        with self._lock:
            if len(self._gauss_rel) > 24:
                self._gauss_rel.clear()
            self._gauss_rel[key] = (g, scores)
        return scores

    def selection_mask(self, g, text: str, li: Optional[int], threshold: float,
                       t: Optional[float] = None) -> torch.Tensor:
        """3D selection: the Gaussians whose relevancy, normalised as the 2D heatmaps are, is
        above ``threshold``. ``li`` None: the level whose 32 best Gaussians score highest
        (:func:`langfield.query.select_gaussians`' choice)."""
        from langfield.query import normalize_map

        nl = len(self.field.levels)
        if li is None:
            per = torch.stack([self.level_scores(g, text, i, t) for i in range(nl)])
            if per.shape[1] == 0:
                return torch.zeros(0, dtype=torch.bool, device=per.device)
            k = max(1, min(32, per.shape[1]))
            s = per[int(torch.argmax(per.topk(k, dim=1).values.mean(1)))]
        else:
            s = self.level_scores(g, text, li, t)
        if s.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=s.device)
        return normalize_map(s[None, None])[0, 0] > float(threshold)

    @torch.no_grad()
    def gaussian_pca(self, g, li: int, decoder, L: int, t: Optional[float] = None) -> torch.Tensor:
        """Per-Gaussian false colours ``[N, 3]``: the first three principal components of the
        decoded features of level ``li``, mapped to [0, 1] (1st..99th percentile)."""
        key = (id(g), li, self._tkey(g, t))
        with self._lock:
            hit = self._pca.get(key)
            if hit is not None and hit[0] is g:
                return hit[1]
        lang = self.lang_of(g, t)
        z = lang[:, li * L:(li + 1) * L]
        N = z.shape[0]
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(N, generator=gen)[:20000].to(z.device) if N > 20000 else slice(None)
        f = F.normalize(decoder.decode(z[idx]).float(), dim=-1)
        mu = f.mean(0)
        q = min(3, f.shape[0], f.shape[1])
        if f.shape[0] >= 2:
            _, _, V = torch.pca_lowrank(f - mu, q=q, center=False)
        else:
            V = torch.eye(f.shape[1], q, device=f.device)
        ps = (f - mu) @ V
        lo, hi = ps.quantile(0.01, dim=0), ps.quantile(0.99, dim=0)
        out = torch.zeros(N, 3, device=z.device)
        for i in range(0, N, 65536):
            part = F.normalize(decoder.decode(z[i:i + 65536]).float(), dim=-1)
            out[i:i + 65536, :q] = ((part - mu) @ V - lo) / (hi - lo + 1e-9)
        out = out.clamp(0, 1)
        with self._lock:
            if len(self._pca) > 8:
                self._pca.clear()
            self._pca[key] = (g, out)
        return out

    # -- the frame ----------------------------------------------------------------------------
    @torch.no_grad()
    def render(self, camera: CameraState, settings: Settings, width: int, height: int, *, quality: str = "rest",
               cancelled: Callable[[], bool] = lambda: False) -> Frame:
        """One frame. Raises :class:`Cancelled` when ``cancelled()`` turns true between stages."""
        from langfield.query import colormap, result_from_maps

        t0 = time.perf_counter()
        width, height = max(int(width), 1), max(int(height), 1)
        vm, K = camera_from_viser(camera, width, height)
        g, levels, L, sh, decoder, has_lang = self.snapshot()
        mode = settings.mode if settings.mode in MODES else "rgb"
        messages: List[str] = []
        text, note = self.clean_query(settings.query)
        if note:
            messages.append(note)
        wants_query = mode in ("relevancy", "mask") or settings.select
        problem = self.language_problem() if (is_language_mode(mode) or (settings.select and text)) else None
        if problem:
            messages.append(problem)
            mode = "rgb" if is_language_mode(mode) else mode
        elif mode in ("relevancy", "mask") and not text:
            messages.append("type a query")
            mode = "rgb"
        li = self._level_index(settings.level, levels)
        t = settings.time if self.is_dynamic(g) else None
        path = ""
        used_level = None
        n_selected = None

        extras: List[torch.Tensor] = []
        sel_mask = None
        if settings.select and text and not problem and wants_query:
            sel_mask = self.selection_mask(g, text, li, settings.threshold, t)
            n_selected = int(sel_mask.sum())
            extras.append(sel_mask.to(g.device, torch.float32)[:, None])
        if mode in ("relevancy", "mask") and self.fused_ok(g, decoder):
            return self._fused_frame(g, vm, K, width, height, settings, mode, text, li, levels, sel_mask,
                                     n_selected, messages, quality, t0, cancelled)
        exact = mode in ("relevancy", "mask") and quality == "rest" and self.exact_budget > 0
        if mode in ("relevancy", "mask"):
            if exact:
                lat = self.lang_of(g, t)
                extras.append(lat if li is None else lat[:, li * L:(li + 1) * L])
            else:
                # auto level while moving: the level the last exact frame chose, when there was one
                lf = li if li is not None else self._known_level.get((id(g), text))
                fast_levels = list(range(len(levels))) if lf is None else [lf]
                per = torch.stack([self.level_scores(g, text, i, t) for i in fast_levels], 1)
                extras.append(per.to(g.device, torch.float32))
        elif mode == "pca":
            lp = len(levels) // 2 if li is None else li
            extras.append(self.gaussian_pca(g, lp, decoder, L, t))
            used_level = levels[lp]
        if cancelled():
            raise Cancelled()
        extra = torch.cat(extras, 1).contiguous() if extras else None
        rgb, depth, alpha, ex = self._rasterize(g, sh, vm, K, width, height, extra, t)
        if cancelled():
            raise Cancelled()
        col = 0
        sel_cov = None
        if sel_mask is not None:
            sel_cov = ex[..., 0]
            col = 1
        out = rgb
        if mode == "depth":
            valid = alpha > 0.5
            if bool(valid.any()):
                d = depth[valid]
                if d.numel() > 1_000_000:
                    pick = torch.randint(0, d.numel(), (1_000_000,), generator=torch.Generator().manual_seed(0))
                    d = d[pick.to(d.device)]
                lo, hi = float(d.quantile(0.01)), float(d.quantile(0.99))
                out = colormap(depth, lo, max(hi, lo + 1e-6)) * valid[..., None]
            else:
                out = torch.zeros_like(rgb)
        elif mode == "pca":
            pc = ex[..., col:col + 3]
            out = (pc / alpha.clamp_min(1e-6)[..., None]).clamp(0, 1) * (alpha > 0.5)[..., None]
        elif mode in ("relevancy", "mask"):
            valid = alpha > 0.5
            maps = ex[..., col:]
            keys = levels if li is None else [levels[li]]
            if not exact:
                keys = [levels[i] for i in fast_levels]
            if exact:
                rel = self._exact_relevancy(maps, keys, L, valid, decoder, text, cancelled)
                path = "exact"
            else:
                rel = (maps / alpha.clamp_min(1e-6)[..., None]).clamp(0, 1) * valid[..., None]
                rel = rel.permute(2, 0, 1)
                path = "fast"
            if cancelled():
                raise Cancelled()
            # smoothing as LanguageField.query does it (auto: scaled with the image size)
            res = result_from_maps(rel, keys, threshold=float(settings.threshold), text=text)
            used_level = res.level
            if exact and li is None:
                with self._lock:
                    if len(self._known_level) > 64:
                        self._known_level.clear()
                    self._known_level[(id(g), text)] = levels.index(res.level)
            out = query_overlay(rgb, res, mode)
        if sel_cov is not None:
            out = selection_overlay(out, sel_cov)
        img = (out.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        return Frame(image=img, width=width, height=height, mode=mode, quality=quality, message="; ".join(messages),
                     level=used_level, path=path, selected=n_selected, seconds=time.perf_counter() - t0,
                     viewmat=vm, K=K, time=t)

    def fused_ok(self, g, decoder) -> bool:
        """A codebook field on static Gaussians: its relevancy frames come from
        :meth:`LanguageField.render_query` (colour, alpha and relevancy in one sparse pass, no
        per-pixel decode), at rest and in motion alike."""
        f = self.field
        return hasattr(f, "render_query") and f._sparse_ok(g, decoder)

    def _fused_frame(self, g, vm, K, width: int, height: int, settings: Settings, mode: str, text: str,
                     li: Optional[int], levels: List[str], sel_mask: Optional[torch.Tensor], n_selected: Optional[int],
                     messages: List[str], quality: str, t0: float, cancelled: Callable[[], bool]) -> Frame:
        """A relevancy / mask frame of a codebook field through ``field.render_query`` (the same
        numbers as ``field.query``), plus the 3D selection's footprint when asked for."""
        level = "auto" if li is None else levels[li]
        r, res = self.field.render_query(vm, K, width, height, text, level=level,
                                         threshold=float(settings.threshold), background=self.background)
        if cancelled():
            raise Cancelled()
        out = query_overlay(r.rgb, res, mode)
        if sel_mask is not None:
            out = selection_overlay(out, self.field.render_selection(sel_mask, vm, K, width, height))
        img = (out.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        return Frame(image=img, width=width, height=height, mode=mode, quality=quality, message="; ".join(messages),
                     level=res.level, path="fused", selected=n_selected, seconds=time.perf_counter() - t0,
                     viewmat=vm, K=K, time=None)

    @torch.no_grad()
    def _exact_relevancy(self, maps: torch.Tensor, keys: List[str], L: int, valid: torch.Tensor, decoder, text: str,
                         cancelled: Callable[[], bool]) -> torch.Tensor:
        """LangSplat's per-pixel decode of the rendered latents ``maps [H, W, levels * L]``
        -> relevancy ``[levels, H, W]``, within ``exact_budget`` rows, in bands."""
        from langfield.query import relevancy_maps

        H, W = valid.shape
        nl = len(keys)
        stride = 1
        while H * W * nl / (stride * stride) > self.exact_budget and stride < 16:
            stride += 1
        tq = self.field.text_query
        emb, canon = tq.embed(text), tq.canon
        lat = maps.float()
        # latents are alpha-weighted sums, as LanguageField.render returns them
        if stride > 1:
            lat = F.avg_pool2d(lat.permute(2, 0, 1)[None], stride, ceil_mode=True)[0].permute(1, 2, 0)
            sv = F.max_pool2d(valid.reshape(1, 1, H, W).float(), stride, ceil_mode=True)[0, 0] > 0
        else:
            sv = valid
        h, w = sv.shape
        rel = torch.zeros(nl, h, w, device=lat.device)
        rows = max(1, self.band_rows // max(w, 1))
        for r0 in range(0, h, rows):
            if cancelled():
                raise Cancelled()
            band = lat[r0:r0 + rows]
            bv = sv[r0:r0 + rows]
            if not bool(bv.any()):
                continue
            bmaps = {k: band[..., i * L:(i + 1) * L] for i, k in enumerate(keys)}
            r, _ = relevancy_maps(bmaps, decoder, emb, canon, valid=bv)
            rel[:, r0:r0 + rows] = r[0]
        if stride > 1:
            rel = F.interpolate(rel[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            rel = rel * valid.to(rel.device)
        return rel


# ------------------------------------------------------------------------------------------ the worker

@dataclass
class Job:
    camera: CameraState
    settings: Settings
    cam_version: int
    set_version: int
    quality: str  # "rest" | "motion"
    width: int
    height: int

    @property
    def key(self) -> Tuple[int, int]:
        return (self.cam_version, self.set_version)


class FpsMeter:
    """Frames delivered per second over the last ``window`` seconds."""

    def __init__(self, window: float = 2.0):
        self.window = float(window)
        self._t: deque = deque()

    def tick(self, t: Optional[float] = None) -> None:
        t = time.perf_counter() if t is None else t
        self._t.append(t)
        while self._t and t - self._t[0] > self.window:
            self._t.popleft()

    def fps(self, last_seconds: Optional[float] = None) -> float:
        if len(self._t) >= 2 and self._t[-1] > self._t[0]:
            return (len(self._t) - 1) / (self._t[-1] - self._t[0])
        if last_seconds:
            return 1.0 / max(last_seconds, 1e-6)
        return 0.0


def frame_size(camera: CameraState, max_res: int, scale: float = 1.0) -> Tuple[int, int]:
    """The frame size for a canvas: its aspect, the longest side at most ``max_res`` (and at most
    the canvas), times ``scale``; at least 16 pixels a side."""
    cw, ch = max(int(camera.width), 1), max(int(camera.height), 1)
    s = min(1.0, float(max_res) / max(cw, ch)) * float(scale)
    return max(16, int(round(cw * s))), max(16, int(round(ch * s)))


class RenderWorker:
    """The render thread of one client.

    * ``update_camera`` / ``update_settings`` only record the newest request and wake the
      thread: requests that arrive while a frame renders are coalesced, the newest wins.
    * The camera counts as **moving** for ``rest_delay`` seconds after its last update: frames
      are then rendered at a lower resolution, scaled so that one takes about
      ``motion_seconds`` (between ``min_motion_scale`` and ``max_motion_scale`` of the rest
      size); once the camera rests, the same view is rendered again at full resolution.
    * **Stale renders are abandoned**: a frame whose settings changed while it rendered, and a
      rest frame whose camera moved, are dropped (between stages, and before delivery); a
      motion frame whose camera moved meanwhile is still delivered (it is the newest picture
      there is), and the next render starts from the newest camera at once.

    ``render(job, cancelled) -> frame`` and ``deliver(job, frame)`` are supplied by the caller;
    ``on_error(job, exc)`` gets exceptions (the thread carries on).
    """

    def __init__(self, render: Callable[[Job, Callable[[], bool]], Any], deliver: Callable[[Job, Any], None], *,
                 on_error: Optional[Callable[[Job, BaseException], None]] = None, rest_delay: float = 0.2,
                 motion_seconds: float = 1 / 15, min_motion_scale: float = 0.25, max_motion_scale: float = 0.5,
                 name: str = "langfield-render"):
        self._render = render
        self._deliver = deliver
        self._on_error = on_error
        self.rest_delay = float(rest_delay)
        self.motion_seconds = float(motion_seconds)
        self.min_motion_scale = float(min_motion_scale)
        self.max_motion_scale = float(max_motion_scale)
        self._cond = threading.Condition()
        self._camera: Optional[CameraState] = None
        self._settings = Settings()
        self._cam_version = 0
        self._set_version = 0
        self._camera_time = 0.0
        self._done: Optional[Tuple[Tuple[int, int], str]] = None  # (key, quality) of the last finished job
        self._stop = False
        self._sec_per_px: Optional[float] = None
        self.stats = {"rendered": 0, "delivered": 0, "abandoned": 0, "errors": 0, "motion": 0, "rest": 0}
        self.fps = FpsMeter()
        self.last_job: Optional[Job] = None
        self.motion_scale = self.max_motion_scale
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- requests ------------------------------------------------------------------------------
    def update_camera(self, camera: CameraState) -> None:
        with self._cond:
            if camera == self._camera:
                return
            self._camera = camera
            self._cam_version += 1
            self._camera_time = time.perf_counter()
            self._cond.notify_all()

    def update_settings(self, settings: Optional[Settings] = None, **changes) -> Settings:
        with self._cond:
            new = replace(settings if settings is not None else self._settings, **changes)
            if new != self._settings:
                self._settings = new
                self._set_version += 1
                self._cond.notify_all()
            return self._settings

    @property
    def settings(self) -> Settings:
        with self._cond:
            return self._settings

    def invalidate(self) -> None:
        """Render again with the same request (the scene changed: a new checkpoint)."""
        with self._cond:
            self._set_version += 1
            self._cond.notify_all()

    def stop(self, join: bool = True) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if join and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the newest request has been rendered at rest (tests, benchmarks)."""
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            with self._cond:
                if self._camera is not None and self._done == ((self._cam_version, self._set_version), "rest"):
                    return True
            time.sleep(0.01)
        return False

    # -- the thread ----------------------------------------------------------------------------
    def _stale(self, job: Job) -> bool:
        # called without the lock: reading two ints is atomic enough for a hint
        if self._stop or self._set_version != job.set_version:
            return True
        return job.quality == "rest" and self._cam_version != job.cam_version

    def _next_job(self) -> Optional[Job]:
        with self._cond:
            while True:
                if self._stop:
                    return None
                if self._camera is None:
                    self._cond.wait()
                    continue
                key = (self._cam_version, self._set_version)
                since = time.perf_counter() - self._camera_time
                rest = since >= self.rest_delay
                if self._done is not None and self._done[0] == key:
                    if self._done[1] == "rest":
                        self._cond.wait()
                        continue
                    if not rest:
                        self._cond.wait(timeout=self.rest_delay - since + 1e-3)
                        continue
                quality = "rest" if rest else "motion"
                scale = 1.0 if rest else self.motion_scale
                w, h = frame_size(self._camera, self._settings.max_res, scale)
                return Job(self._camera, self._settings, key[0], key[1], quality, w, h)

    def _adapt(self, job: Job, seconds: float) -> None:
        px = job.width * job.height
        spp = seconds / max(px, 1)
        self._sec_per_px = spp if self._sec_per_px is None else 0.7 * self._sec_per_px + 0.3 * spp
        full_w, full_h = frame_size(job.camera, job.settings.max_res, 1.0)
        want = math.sqrt(self.motion_seconds / (self._sec_per_px * full_w * full_h))
        self.motion_scale = min(self.max_motion_scale, max(self.min_motion_scale, want))

    def _loop(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            self.last_job = job
            t0 = time.perf_counter()
            try:
                frame = self._render(job, lambda: self._stale(job))
            except Cancelled:
                self.stats["abandoned"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - the thread must survive anything a frame does
                self.stats["errors"] += 1
                with self._cond:
                    self._done = (job.key, "rest")
                if self._on_error is not None:
                    try:
                        self._on_error(job, e)
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()
                else:
                    traceback.print_exc()
                continue
            dt = time.perf_counter() - t0
            self.stats["rendered"] += 1
            self._adapt(job, dt)
            if self._stale(job):
                self.stats["abandoned"] += 1
                continue
            try:
                self._deliver(job, frame)
            except Exception as e:  # noqa: BLE001 - e.g. the client went away mid-send
                self.stats["errors"] += 1
                if self._on_error is not None:
                    try:
                        self._on_error(job, e)
                    except Exception:  # noqa: BLE001
                        pass
            self.stats["delivered"] += 1
            self.stats[job.quality] += 1
            self.fps.tick()
            with self._cond:
                self._done = (job.key, job.quality)
