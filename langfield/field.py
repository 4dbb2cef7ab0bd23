"""A trained scene ready to look at and query: :class:`LanguageField`.

One object for everything that *uses* a trained scene (``langfield query``, ``langfield eval``,
the viewer): the Gaussians (with their language latents when the run has a language stage),
the scene autoencoder's decoder, the text encoder the features were made with, the level
names and the dataset's cameras.

``LanguageField.load(path)`` opens

* a **run folder**: the newest language checkpoint (``RUN/language/checkpoints/``) when there
  is one, else the newest RGB checkpoint (``RUN/checkpoints/``); ``RUN/autoencoder.*`` and the
  text encoder recorded in ``RUN/config.json`` (``language.text``); the dataset's cameras when
  the dataset is still where the run says (cameras only: no image is read);
* a **3DGS PLY** (plain: RGB only; with ``lang_*`` properties and an autoencoder next to it
  (``<stem>.autoencoder.safetensors`` or ``autoencoder.safetensors`` in the same folder) and a
  ``<stem>.json`` / run config naming the text encoder: queries too).

:meth:`render` draws colour, expected depth, alpha and every level's latents in **one** pass
of the rasterizer (SH colours evaluated per Gaussian, latents as extra channels; a codebook
field draws colour + depth and keeps its sparse pass for later: ``latents`` is a
:class:`LazyLatents`, and :meth:`query` scores the Gaussians' (index, weight) pairs inside the
tiles without making coefficient maps; :meth:`render_query` does colour, depth and relevancy in
one pass);
:meth:`query` turns a render into relevancy / heatmap / mask for a text (LERF relevancy,
level choice, smoothing; :mod:`langfield.query`); :meth:`select` scores the Gaussians
themselves (3D selection); :meth:`reload` picks up a newer checkpoint of a run that is still
training.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["LanguageField", "FieldCamera", "FieldRender", "FieldError", "NoLanguageError", "latest_language_checkpoint",
           "LANGUAGE_DIR", "LazyLatents", "SparsePass"]

PathLike = Union[str, os.PathLike]
LANGUAGE_DIR = "language"  # RUN/language/checkpoints/


class FieldError(ValueError):
    """The path is not a run folder or a Gaussian PLY, or its parts do not fit together."""


class NoLanguageError(FieldError):
    """A text query on a scene without language latents."""


@dataclass
class FieldCamera:
    name: str
    viewmat: np.ndarray  # [4, 4] OpenCV world-to-camera (the run's normalised world)
    K: np.ndarray  # [3, 3]
    width: int
    height: int
    split: str = "train"
    index: int = 0
    time: Optional[float] = None


class LazyLatents(Mapping):
    """``{level: [H, W, L]}`` made on first access by ``compute()`` (a codebook field's
    coefficient maps come from a second, sparse pass that a query through the fused path never
    needs). Iterating and ``len`` do not compute; thread-safe."""

    def __init__(self, levels: Sequence[str], compute: Callable[[], Dict[str, Tensor]]):
        self._levels = list(levels)
        self._compute: Optional[Callable[[], Dict[str, Tensor]]] = compute
        self._maps: Optional[Dict[str, Tensor]] = None
        self._lock = threading.Lock()

    @property
    def computed(self) -> bool:
        return self._maps is not None

    def _get(self) -> Dict[str, Tensor]:
        with self._lock:
            if self._maps is None:
                self._maps = self._compute()
                self._compute = None
            return self._maps

    def __getitem__(self, level: str) -> Tensor:
        if level not in self._levels:
            raise KeyError(level)
        return self._get()[level]

    def __iter__(self) -> Iterator[str]:
        return iter(self._levels)

    def __len__(self) -> int:
        return len(self._levels)

    def __repr__(self) -> str:
        return f"LazyLatents({self._levels}, computed={self.computed})"


@dataclass
class SparsePass:
    """What a codebook field's render keeps for its queries: the scene snapshot, the cameras,
    the colour pass's projection and tile lists (``meta``; None: project again) and the
    per-Gaussian (index, weight) pairs (``k`` per level, channels of all levels)."""
    gaussians: Any
    cameras: Any
    meta: Optional[Dict[str, Any]]
    idx: Tensor  # [N, levels * k] int32
    w: Tensor  # [N, levels * k]
    k: int
    latent_dim: int
    levels: List[str]
    backend: str = "auto"
    t: Optional[float] = None

    def latents(self) -> Dict[str, Tensor]:
        """The coefficient maps of every level through the sparse pass."""
        from langfield.render.sparse import render_sparse

        L = self.latent_dim
        z = render_sparse(self.gaussians, self.cameras, self.idx, self.w, len(self.levels) * L, meta=self.meta,
                          t=self.t, backend=self.backend).lang[0]
        return {lv: z[..., i * L:(i + 1) * L] for i, lv in enumerate(self.levels)}


@dataclass
class FieldRender:
    rgb: Tensor  # [H, W, 3] in [0, 1]
    depth: Tensor  # [H, W] expected depth (0 where nothing is drawn)
    alpha: Tensor  # [H, W]
    latents: Optional[Mapping] = None  # {level: [H, W, L]} (a LazyLatents for codebook fields)
    sparse: Optional[SparsePass] = field(default=None, repr=False, compare=False)  # codebook fields

    @property
    def size(self) -> Tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def latest_language_checkpoint(run: PathLike) -> Optional[Path]:
    from langfield.run import RunFolder

    return RunFolder(run).store("language").latest_path()


def _resolve_device(device) -> torch.device:
    from langfield.run import resolve_device

    return resolve_device(device, error=FieldError)


def _codec_of(lang_doc: Dict[str, Any]) -> Tuple[str, str]:
    """(kind, file name) of a run's or PLY sidecar's language codec (old runs: the autoencoder)."""
    c = lang_doc.get("codec") or {}
    kind = c.get("kind", "autoencoder")
    from langfield.codec import codec_file

    return kind, c.get("file") or lang_doc.get("autoencoder") or codec_file(kind)


class LanguageField:
    """See the module docstring. Thread-safe for concurrent :meth:`render` / :meth:`query`
    calls (they read the tensors; :meth:`reload` swaps them under a lock)."""

    def __init__(self, gaussians, *, decoder=None, text_encoder=None, levels: Sequence[str] = (),
                 latent_dim: int = 0, cameras: Sequence[FieldCamera] = (), sh_degree: Optional[int] = None,
                 source: Optional[PathLike] = None, kind: str = "memory", step: Optional[int] = None,
                 stage: str = "rgb", backend: str = "auto", info: Optional[Dict[str, Any]] = None):
        self.gaussians = gaussians
        self.decoder = decoder
        self.text_encoder = text_encoder
        self.levels = list(levels)
        self.latent_dim = int(latent_dim)
        self.cameras = list(cameras)
        self.sh_degree = gaussians.sh_degree if sh_degree is None else int(sh_degree)
        self.source = Path(source) if source is not None else None
        self.kind = kind
        self.step = step
        self.stage = stage
        self.backend = backend
        self.info = dict(info or {})
        self._lock = threading.RLock()
        self._tq = None
        self._ckpt_path: Optional[Path] = None
        if self.has_language:
            n = len(self.levels) * self.latent_dim
            if gaussians.lang_dim != n:
                raise FieldError(f"the Gaussians carry {gaussians.lang_dim} language channels, but "
                                 f"{len(self.levels)} levels x {self.latent_dim} latents = {n} were expected")

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: PathLike, device="auto", *, text_encoder=None, need_cameras: bool = True,
             backend: str = "auto") -> "LanguageField":
        p = Path(path).expanduser()
        if p.is_dir():
            return cls._load_run(p, device, text_encoder, need_cameras, backend)
        if p.is_file() and p.suffix.lower() == ".ply":
            return cls._load_ply(p, device, text_encoder, backend)
        if not p.exists():
            raise FieldError(f"{p}: not found (expected a run folder or a .ply file)")
        raise FieldError(f"{p}: expected a run folder or a .ply file")

    @classmethod
    def _load_run(cls, run: Path, device, text_encoder, need_cameras: bool, backend: str) -> "LanguageField":
        from langfield.run import RunError, RunFolder, model_from_checkpoint, scene_checkpoint

        rf = RunFolder(run)
        try:
            doc = rf.read_config()
        except RunError as e:
            raise FieldError(str(e)) from None
        dev = _resolve_device(device)
        stage, ck_path, ck = scene_checkpoint(run)  # the one rule: newest valid language, else RGB checkpoint
        if ck is None:
            raise FieldError(f"{run}: no readable checkpoint in {rf.checkpoints} (train first)")
        lang_ck = ck_path if stage == "language" else None
        lang_damaged = lang_ck is None and bool(rf.store("language").steps())
        try:
            g = model_from_checkpoint(doc, ck, dev)
        except RunError as e:
            raise FieldError(str(e)) from None
        lang_doc = doc.get("language") or {}
        levels: List[str] = []
        L = 0
        decoder = None
        te = text_encoder
        if g.lang is not None and lang_ck is not None:
            levels = list(lang_doc.get("levels") or [])
            L = int(lang_doc.get("latent_dim") or 0)
            kind, fname = _codec_of(lang_doc)
            ae = run / Path(fname).name
            if not levels or not L:
                raise FieldError(f"{rf.config}: the run has language checkpoints but no 'language' section "
                                 f"(levels, latent_dim)")
            if not ae.is_file():
                raise FieldError(f"{ae}: missing; the run's language latents cannot be decoded without it")
            from langfield.codec import CodecError, load_codec

            try:
                decoder = load_codec(ae, kind, device=dev)
            except (CodecError, ValueError, OSError) as e:
                raise FieldError(f"{ae}: {str(e).splitlines()[0]}") from None
            if te is None and lang_doc.get("text"):
                from langfield.features.text import load_text_encoder

                te = load_text_encoder(lang_doc["text"], device=dev)
        elif g.lang is not None:
            g.set_lang(None)
        from langfield.train.config import trained_sh_degree

        rgb_step = int(ck.config.get("rgb_step", ck.step))
        sh = trained_sh_degree(doc.get("train", {}), rgb_step, g.sh_degree)
        cams = _run_cameras(doc, run) if need_cameras else []
        self = cls(g, decoder=decoder, text_encoder=te, levels=levels, latent_dim=L, cameras=cams, sh_degree=sh,
                   source=run, kind="run", step=int(ck.step), stage="language" if decoder is not None else "rgb",
                   backend=backend,
                   info={"background": doc.get("dataset", {}).get("background"), "text": lang_doc.get("text"),
                         "features": lang_doc.get("features"), "language_damaged": lang_damaged})
        self._ckpt_path = Path(ck_path)
        return self

    @classmethod
    def _load_ply(cls, path: Path, device, text_encoder, backend: str) -> "LanguageField":
        from langfield.io.ply import PlyError, read_ply

        dev = _resolve_device(device)
        try:
            g = read_ply(path, requires_grad=False).to(dev)
        except PlyError as e:
            raise FieldError(str(e)) from None
        decoder, levels, L, te = None, [], 0, text_encoder
        if g.lang is not None:
            meta_path = path.with_suffix(".json")
            meta: Dict[str, Any] = {}
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text("utf-8")).get("language") or {}
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                    raise FieldError(f"{meta_path}: corrupt JSON ({e})") from None
            kind = (meta.get("codec") or {}).get("kind", "autoencoder")
            stem = Path(_codec_of({"codec": {"kind": kind}})[1]).stem
            ae = next((q for q in (path.with_name(f"{path.stem}.{stem}.safetensors"),
                                   path.with_name(f"{stem}.safetensors")) if q.is_file()), None)
            if ae is not None and meta.get("levels"):
                from langfield.codec import CodecError, load_codec

                try:
                    decoder = load_codec(ae, kind, device=dev)
                except (CodecError, ValueError, OSError) as e:
                    raise FieldError(f"{ae}: {str(e).splitlines()[0]}") from None
                levels = list(meta["levels"])
                L = int(meta.get("latent_dim") or decoder.latent_dim)
                if te is None and meta.get("text"):
                    from langfield.features.text import load_text_encoder

                    te = load_text_encoder(meta["text"], device=dev)
            else:
                g.set_lang(None)  # latents we cannot decode: RGB only
        return cls(g, decoder=decoder, text_encoder=te, levels=levels, latent_dim=L, source=path, kind="ply",
                   stage="language" if decoder is not None else "rgb", backend=backend)

    def reload(self) -> bool:
        """For a run folder: load a newer checkpoint if one appeared (a run still training).
        Returns True when something new was loaded."""
        if self.kind != "run" or self.source is None:
            return False
        from langfield.run import RunFolder

        newest = latest_language_checkpoint(self.source) or RunFolder(self.source).latest_checkpoint()
        if newest is None or (self._ckpt_path is not None and Path(newest) == self._ckpt_path):
            return False
        try:
            fresh = LanguageField._load_run(self.source, self.device, self.text_encoder if self.has_language else None,
                                            need_cameras=False, backend=self.backend)
        except Exception:  # a checkpoint being rotated away mid-read: try again next time
            return False
        with self._lock:
            self.gaussians, self.decoder, self.levels = fresh.gaussians, fresh.decoder, fresh.levels
            self.latent_dim, self.sh_degree, self.step, self.stage = (fresh.latent_dim, fresh.sh_degree, fresh.step,
                                                                      fresh.stage)
            if fresh.text_encoder is not None:
                self.text_encoder = fresh.text_encoder
                self._tq = None
            self._ckpt_path = fresh._ckpt_path
        return True

    # ------------------------------------------------------------------------------ facts
    @property
    def codec(self):
        """The language codec (:mod:`langfield.codec`); ``decoder`` is its older name."""
        return self.decoder

    @property
    def has_language(self) -> bool:
        return self.decoder is not None and self.gaussians.lang is not None and bool(self.levels)

    @property
    def can_query(self) -> bool:
        return self.has_language and self.text_encoder is not None

    @property
    def num(self) -> int:
        return self.gaussians.num

    @property
    def device(self) -> torch.device:
        return self.gaussians.device

    @property
    def text_query(self):
        from langfield.query import TextQuery

        if self.text_encoder is None:
            raise NoLanguageError("no text encoder for this scene")
        if self._tq is None:
            self._tq = TextQuery(self.text_encoder)
        return self._tq

    def level_index(self, level: Union[str, int, None]) -> Optional[int]:
        """None/"auto" -> None; a level name or index -> its index (ValueError otherwise)."""
        if level is None or level == "auto":
            return None
        if isinstance(level, int) or (isinstance(level, str) and level.lstrip("-").isdigit()):
            i = int(level)
            if not -len(self.levels) <= i < len(self.levels):
                raise ValueError(f"level {level} out of range: the scene has levels {self.levels}")
            return i % len(self.levels)
        if level not in self.levels:
            raise ValueError(f"unknown level {level!r}: the scene has levels {self.levels} (or auto)")
        return self.levels.index(level)

    def _require_language(self) -> None:
        if not self.has_language and self.info.get("language_damaged"):
            raise NoLanguageError(f"{self.source}: every language checkpoint in "
                                  f"{Path(self.source) / LANGUAGE_DIR / 'checkpoints'} is damaged (see the warnings); "
                                  f"train the language stage again with --overwrite-language")
        if not self.has_language:
            raise NoLanguageError(f"{self.source or 'this scene'} has no language field "
                                  f"(train one with `langfield train DATA --out RUN --features labels|sam-clip|dense-clip`)")
        if self.text_encoder is None:
            raise NoLanguageError(f"{self.source or 'this scene'}: the text encoder the features were made with is "
                                  f"not recorded; queries need it")

    # ------------------------------------------------------------------------------ render
    @torch.no_grad()
    def render(self, viewmat, K, width: int, height: int, *, language: bool = True, background=(0.0, 0.0, 0.0),
               sh_degree: Optional[int] = None, t: Optional[float] = None) -> FieldRender:
        """Colour, expected depth, alpha and (``language`` and the scene has them) every level's
        latents of one view, in one rasterizer pass; ``t``: the time for a dynamic scene."""
        from langfield.render.model import Cameras, render

        with self._lock:  # one consistent snapshot (a reload may swap the checkpoint meanwhile)
            g, decoder = self.gaussians, self.decoder
            levels, L = list(self.levels), self.latent_dim
            deg = self.sh_degree if sh_degree is None else min(int(sh_degree), g.sh_degree)
            with_lang = language and decoder is not None and g.lang is not None and bool(levels)
        cams = Cameras.of(viewmat, K, width, height, device=g.device)
        if with_lang and self._sparse_ok(g, decoder):
            # codebook: colour + depth now; the coefficients through the sparse pass when asked for
            # (LazyLatents), a query through the fused sparse relevancy pass (no coefficient maps)
            out = render(g, cams, t=t, sh_degree=deg, depth=True, background=background, backend=self.backend)
            idx, w, k = self._sparse_pairs(g, L, len(levels))
            sp = SparsePass(g, cams, out.meta, idx, w, k, L, levels, self.backend, t)
            return FieldRender(rgb=out.rgb[0].clamp(0, 1), depth=out.depth[0], alpha=out.alpha[0],
                               latents=LazyLatents(levels, sp.latents), sparse=sp)
        out = render(g, cams, t=t, sh_degree=deg, language=with_lang, depth=True, background=background,
                     backend=self.backend)
        lat = None
        if with_lang:
            z = out.lang[0]
            lat = {lv: z[..., i * L:(i + 1) * L] for i, lv in enumerate(levels)}
        return FieldRender(rgb=out.rgb[0].clamp(0, 1), depth=out.depth[0], alpha=out.alpha[0], latents=lat)

    @staticmethod
    def _sparse_ok(g, decoder) -> bool:
        """The sparse path serves codebook codecs on static Gaussians (a dynamic model's latents
        change with time; its render stays dense)."""
        from langfield.scene import Gaussians

        return (getattr(decoder, "kind", None) == "codebook" and hasattr(decoder, "codebook")
                and isinstance(g, Gaussians) and type(g).activated is Gaussians.activated and g.lang is not None)

    def _sparse_pairs(self, g, L: int, n_levels: int) -> Tuple[Tensor, Tensor, int]:
        """(index, weight) pairs of the stored coefficients, cached per tensor version: ``k`` is
        the largest number of non-zeros of a level (the codec's top-k for a trained field; more
        for a checkpoint taken while the coefficients were still dense), so the pairs are exact."""
        from langfield.render.sparse import sparse_topk

        lang = g.lang
        key = (id(g), lang.data_ptr(), lang._version, tuple(lang.shape), L)
        with self._lock:
            hit = getattr(self, "_pairs_cache", None)
            if hit is not None and hit[0] == key:
                return hit[1]
        x = lang.detach().reshape(lang.shape[0], n_levels, L)
        k = max(1, int((x != 0).sum(-1).max())) if lang.shape[0] else 1
        idx, w = sparse_topk(lang.detach(), L, k)
        with self._lock:
            self._pairs_cache = (key, (idx, w, k))
        return idx, w, k

    def render_camera(self, cam: Union[int, FieldCamera], **kw) -> FieldRender:
        c = self.cameras[cam] if isinstance(cam, int) else cam
        if c.time is not None:
            kw.setdefault("t", c.time)
        return self.render(c.viewmat, c.K, c.width, c.height, **kw)

    # ------------------------------------------------------------------------------ queries
    @torch.no_grad()
    def query(self, render: FieldRender, text: Union[str, Sequence[str]], *, level: Union[str, int, None] = "auto",
              threshold: float = 0.4, smooth: Optional[int] = None, stride: int = 1, min_alpha: float = 0.5,
              chunk: int = 65536):
        """Relevancy, level choice, localisation point, heatmap and mask of ``text`` (one string
        -> a :class:`~langfield.query.QueryResult`; a list -> a list, one decode pass) on a
        :meth:`render`. ``level``: auto (highest smoothed relevancy) or a level name/index.
        Pixels with alpha below ``min_alpha`` (empty space) get relevancy 0."""
        from langfield.query import query_maps

        self._require_language()
        if render.latents is None:
            raise ValueError("the render has no latents (render with language=True)")
        texts = _texts(text)
        if not texts:
            return []
        li = self.level_index(level)
        with self._lock:
            decoder = self.decoder
        tq = self.text_query
        emb, canon = tq.embed(texts), tq.canon
        sp = render.sparse
        if sp is not None and stride == 1 and hasattr(decoder, "codebook"):
            res = self._query_sparse(sp, decoder, emb, canon, li, texts, threshold=threshold, smooth=smooth,
                                     min_alpha=min_alpha)
            return res[0] if isinstance(text, str) else res
        maps = render.latents if li is None else {self.levels[li]: render.latents[self.levels[li]]}
        valid = render.alpha > min_alpha if min_alpha > 0 else None
        res = query_maps(maps, decoder, emb, canon, smooth=smooth, threshold=threshold, stride=stride, valid=valid,
                         chunk=chunk, texts=texts)
        return res[0] if isinstance(text, str) else res

    @staticmethod
    def _codebook_scores(codec, emb: Tensor, canon: Tensor) -> Tuple[Tensor, Tensor]:
        """``A = C E^T [L, Q + canonical]`` (the queries first) and the codebook Gram ``G``."""
        import torch.nn.functional as F

        C = codec.codebook
        E = F.normalize(torch.cat([emb.reshape(-1, emb.shape[-1]), canon]).to(C.device, C.dtype), dim=-1)
        return C @ E.t(), codec.gram() if hasattr(codec, "gram") else C @ C.t()

    def _query_sparse(self, sp: SparsePass, codec, emb: Tensor, canon: Tensor, li: Optional[int], texts: List[str],
                      *, threshold: float, smooth: Optional[int], min_alpha: float, colors: bool = False,
                      background=(0.0, 0.0, 0.0), sh_degree: Optional[int] = None):
        """The codebook query through the fused sparse relevancy pass (``sp.meta`` None: one pass
        that also draws colour + depth; returns ``(results, RenderOutput)`` then)."""
        from langfield.query import TEMPERATURE, results_from_relevancy
        from langfield.render.sparse import render_sparse_relevancy, select_levels

        A, G = self._codebook_scores(codec, emb, canon)
        dev = sp.w.device
        if li is None:
            idx, w, keys = sp.idx, sp.w, list(sp.levels)
        else:
            idx, w = select_levels(sp.idx, sp.w, sp.latent_dim, sp.k, [li])
            keys = [sp.levels[li]]
        rel, out = render_sparse_relevancy(
            sp.gaussians, sp.cameras, idx, w, len(keys), A.to(dev), G.to(dev), len(texts), temperature=TEMPERATURE,
            min_alpha=float(min_alpha) if min_alpha > 0 else -1.0, meta=sp.meta, colors=colors, depth=colors,
            background=background if colors else None, sh_degree=sh_degree, t=sp.t, backend=sp.backend)
        res = results_from_relevancy(rel[0], keys, smooth=smooth, threshold=threshold, texts=texts)
        return (res, out) if sp.meta is None else res

    @torch.no_grad()
    def render_query(self, viewmat, K, width: int, height: int, text: Union[str, Sequence[str]], *,
                     level: Union[str, int, None] = "auto", threshold: float = 0.4, smooth: Optional[int] = None,
                     min_alpha: float = 0.5, background=(0.0, 0.0, 0.0), sh_degree: Optional[int] = None,
                     t: Optional[float] = None):
        """A relevancy frame: ``(render, result)`` (a list of texts -> a list of results), the same
        as ``r = render(...)`` then ``query(r, text, ...)``. A codebook field does it in **one**
        pass over the tiles: colour, depth, alpha and every level's relevancy together, the
        per-pixel coefficients never leaving the tile (``render.latents`` is computed if read)."""
        from langfield.render.model import Cameras

        self._require_language()
        texts = _texts(text)
        li = self.level_index(level)
        with self._lock:
            g, decoder = self.gaussians, self.decoder
            levels, L = list(self.levels), self.latent_dim
            deg = self.sh_degree if sh_degree is None else min(int(sh_degree), g.sh_degree)
        if not self._sparse_ok(g, decoder):
            r = self.render(viewmat, K, width, height, background=background, sh_degree=sh_degree, t=t)
            return r, self.query(r, text, level=level, threshold=threshold, smooth=smooth, min_alpha=min_alpha)
        cams = Cameras.of(viewmat, K, width, height, device=g.device)
        idx, w, k = self._sparse_pairs(g, L, len(levels))
        sp = SparsePass(g, cams, None, idx, w, k, L, levels, self.backend, t)
        tq = self.text_query
        res, out = self._query_sparse(sp, decoder, tq.embed(texts), tq.canon, li, texts, threshold=threshold,
                                      smooth=smooth, min_alpha=min_alpha, colors=True, background=background,
                                      sh_degree=deg)
        r = FieldRender(rgb=out.rgb[0].clamp(0, 1), depth=out.depth[0], alpha=out.alpha[0],
                        latents=LazyLatents(levels, sp.latents), sparse=sp)
        return r, (res[0] if isinstance(text, str) else res)

    @torch.no_grad()
    def select(self, text: Union[str, Sequence[str]], *, level: Union[str, int, None] = "auto",
               threshold: float = 0.4, normalize: bool = True):
        """3D selection: a :class:`~langfield.query.Selection` of the Gaussians matching ``text``
        (a list of texts -> a list, one decode pass); see :func:`langfield.query.select_gaussians`
        (default: scores normalised over the Gaussians like the 2D maps, threshold 0.4)."""
        from langfield.query import select_gaussians

        self._require_language()
        texts = _texts(text)
        if not texts:
            return []
        li = self.level_index(level)
        with self._lock:
            g, decoder, nl = self.gaussians, self.decoder, len(self.levels)
        tq = self.text_query
        res = select_gaussians(g.lang, decoder, tq.embed(texts), tq.canon, level=li, threshold=threshold,
                               normalize=normalize, n_levels=nl)
        return res[0] if isinstance(text, str) else res

    @torch.no_grad()
    def render_selection(self, mask: Tensor, viewmat, K, width: int, height: int, t: Optional[float] = None) -> Tensor:
        """Alpha of only the ``mask``-ed Gaussians, occluded by the others (a 3D selection's
        footprint in a view): ``mask [N]`` -> ``[H, W]``; ``[N, Q]`` (several selections, one
        pass) -> ``[H, W, Q]``."""
        from langfield.render.model import Cameras, render

        with self._lock:
            g = self.gaussians
        dev = g.device
        col = mask.to(dev, torch.float32)
        one = col.ndim == 1
        col = col.reshape(col.shape[0], -1)
        out = render(g, Cameras.of(viewmat, K, width, height, device=dev), t=t, colors=False, extra=col,
                     backend=self.backend)
        return out.extra[0, ..., 0] if one else out.extra[0]

    @torch.no_grad()
    def pca(self, render: FieldRender, level: Union[str, int, None] = None) -> Tensor:
        """False-colour ``[H, W, 3]`` of the decoded features of one level (default: the
        middle one): the first three principal components of the decoded CLIP features over
        the drawn pixels, mapped to [0, 1]."""
        self._require_language()
        li = self.level_index(level)
        li = len(self.levels) // 2 if li is None else li
        z = render.latents[self.levels[li]]
        H, W, L = z.shape
        with self._lock:
            decoder = self.decoder
        pts = z.reshape(-1, L)
        ok = (render.alpha.reshape(-1) > 0.5)
        if int(ok.sum()) < 3:
            return torch.zeros(H, W, 3, device=z.device)
        sample = pts[ok]
        if len(sample) > 20000:
            sample = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))[:20000].to(
                sample.device)]
        f = decoder.decode(sample)
        mu = f.mean(0)
        _, _, V = torch.pca_lowrank(f - mu, q=3, center=False)
        proj_s = (f - mu) @ V
        lo, hi = proj_s.quantile(0.01, dim=0), proj_s.quantile(0.99, dim=0)
        out = torch.zeros(H * W, 3, device=z.device)
        for i in range(0, H * W, 65536):
            part = decoder.decode(pts[i:i + 65536])
            out[i:i + 65536] = ((part - mu) @ V - lo) / (hi - lo + 1e-9)
        out = out.clamp(0, 1) * ok[:, None]
        return out.reshape(H, W, 3)


def _texts(text: Union[str, Sequence[str]]) -> List[str]:
    """One query or a list of them; an empty or blank one raises ValueError."""
    texts = [text] if isinstance(text, str) else list(text)
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError("an empty query: type some text")
    return texts


def _run_cameras(doc: Dict[str, Any], run: Optional[Path] = None) -> List[FieldCamera]:
    """The run's cameras: ``RUN/cameras.json`` when the run carries its own (mapping runs),
    else its dataset's (no images read); [] when neither is there."""
    from langfield.train.config import TrainConfig

    if run is not None:
        cams = read_cameras_json(Path(run) / "cameras.json")
        if cams:
            return cams

    data = doc.get("data")
    if not data or not Path(data).exists():
        return []
    try:
        cfg = TrainConfig.from_dict(doc["train"])
        from langfield.data import load_dataset

        ds = load_dataset(data, downscale=cfg.downscale, normalize=cfg.normalize, test_every=cfg.test_every,
                          background=(1.0, 1.0, 1.0), cache_images=False)
    except Exception:
        return []
    return dataset_cameras(ds)


def dataset_cameras(ds) -> List[FieldCamera]:
    """A loaded dataset's frames as :class:`FieldCamera` s (no images read)."""
    split_of = {}
    for sp in ("train", "test", "val"):
        for i in ds.indices(sp):
            split_of.setdefault(i, sp)
    return [FieldCamera(f.name, np.asarray(f.viewmat, dtype=np.float64), np.asarray(f.K, dtype=np.float64),
                        int(f.width), int(f.height), split_of.get(i, "train"), i, f.time)
            for i, f in enumerate(ds.frames)]


def read_cameras_json(path: Path) -> List[FieldCamera]:
    """Cameras from a ``cameras.json`` (``{"cameras": [{"name", "viewmat" 4x4, "K" 3x3, "width",
    "height", "split", "time"?}]}``); [] when absent or unreadable."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text("utf-8"))
        out = []
        for i, c in enumerate(doc.get("cameras", [])):
            out.append(FieldCamera(str(c.get("name", i)), np.asarray(c["viewmat"], dtype=np.float64).reshape(4, 4),
                                   np.asarray(c["K"], dtype=np.float64).reshape(3, 3), int(c["width"]),
                                   int(c["height"]), str(c.get("split", "train")), i,
                                   None if c.get("time") is None else float(c["time"])))
        return out
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return []
