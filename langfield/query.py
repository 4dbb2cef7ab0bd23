"""Text queries on a language field: relevancy maps, masks, localisation, 3D selection.

**Relevancy** (LERF, as LangSplat evaluates it): for a feature ``f`` (L2-normalised CLIP
space), a query embedding ``q`` and canonical phrases ``c_i`` ("object", "things", "stuff",
"texture")::

    relevancy(f) = min_i softmax(T <f,q>, T <f,c_i>)[0]        T = 10
                 = sigmoid(T (<f,q> - max_i <f,c_i>))          (the same number, cheaper)

0.5 means "as close to the query as to the nearest canonical phrase".

**2D** (:func:`query_maps`): the rendered latent map of each level is decoded pixel by pixel in
chunks (the ``[H, W, 512]`` features never exist: at 640x480 they would be 630 MB per level),
each chunk turned into relevancy on the fly, for any number of queries in one decode pass.
Then, per query (defaults mirror LangSplat's LERF-ovs evaluation):

* ``smoothed`` = mean filter of ``smooth`` x ``smooth`` pixels (reflected borders) of each
  level's relevancy;
* the **level** is the one whose ``smoothed`` map has the highest maximum; the **point**
  (localisation) is that map's argmax, as ``(x, y)`` = (column, row) pixel indices;
* the **mask** of a level: ``m = mask_blend * smoothed + (1 - mask_blend) * relevancy``
  (0.5), normalised as ``clip(2 (m - min m) / (max m - min m) - 1, 0, 1)`` (the top half of
  the map's range stretched to [0, 1]), thresholded at ``threshold`` (0.4); optionally a
  majority filter over ``majority`` x ``majority`` pixels removes speckle (0, the default:
  off, as in LangSplat; it erases thin parts such as a lamp's arm at low resolution).
* ``smooth`` (None = auto) is LangSplat's 29 pixels at LERF-ovs' image size (728 pixels on the
  short side) scaled to the image: ``max(3, odd(29 * min(H, W) / 728))``, so that the filter
  covers the same part of the view at any resolution (at 256x256: 11).
  ``heatmap`` is the normalised map of the chosen level.

:func:`relevancy_maps` (the decode pass) and :func:`result_from_maps` (the post-processing)
are public so the evaluation can feed relevancy from other sources.

**3D** (:func:`select_gaussians`): per-Gaussian latents are decoded in chunks and scored the
same way; by default the scores are normalised over the Gaussians like the 2D maps, and those
above ``threshold`` (0.4, as the 2D masks) are selected (``normalize=False``: raw relevancy). :func:`recolor` paints them (RGB or SH DC coefficients).

**Pictures**: :func:`heatmap_overlay` (turbo colour map from a 256-entry table computed from
Google's polynomial fit of turbo; no matplotlib) and :func:`save_png`.

Nothing here imports :mod:`langfield.features`: text comes in through anything with
``encode(list[str]) -> Tensor [n, D]`` (:class:`TextEncoderLike`), or as embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import (Callable, Dict, Hashable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CANONICAL_PHRASES", "TEMPERATURE", "TextEncoderLike", "TextQuery", "relevancy", "relevancy_from_scores",
           "decode_scores", "relevancy_maps", "query_maps", "result_from_maps", "results_from_relevancy", "QueryResult",
           "Selection",
           "select_gaussians", "recolor", "box_filter", "majority_filter", "auto_smooth", "normalize_map", "split_levels",
           "heatmap_overlay", "colormap", "save_png"]

CANONICAL_PHRASES: Tuple[str, ...] = ("object", "things", "stuff", "texture")
TEMPERATURE = 10.0
from langfield.maths import SH_C0  # noqa: E402

Decoder = Union["torch.nn.Module", Callable[[Tensor], Tensor], None]


# ------------------------------------------------------------------------------------------
# text

@runtime_checkable
class TextEncoderLike(Protocol):
    def encode(self, texts: List[str]) -> Tensor:  # [n, D], rows L2-normalised
        ...


class TextQuery:
    """Embeddings of queries and of the canonical phrases through a text encoder, cached.

    ``tq = TextQuery(encoder)``; ``tq.canon`` -> ``[C, D]``; ``tq.embed("red mug")`` -> ``[D]``;
    ``tq.embed(["a", "b"])`` -> ``[2, D]``. Rows are L2-normalised here whatever the encoder
    returns."""

    def __init__(self, encoder: TextEncoderLike, canonical: Sequence[str] = CANONICAL_PHRASES):
        if not hasattr(encoder, "encode"):
            raise TypeError("TextQuery: the encoder needs an encode(list[str]) -> Tensor [n, D] method")
        if not len(canonical):
            raise ValueError("TextQuery: at least one canonical phrase is needed")
        self.encoder = encoder
        self.canonical = tuple(canonical)
        self._cache: Dict[str, Tensor] = {}
        self._canon: Optional[Tensor] = None

    @property
    def canon(self) -> Tensor:
        if self._canon is None:
            self._canon = self._encode(list(self.canonical))
        return self._canon

    def embed(self, texts: Union[str, Sequence[str]]) -> Tensor:
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        todo = [t for t in dict.fromkeys(items) if t not in self._cache]
        if todo:
            for t, e in zip(todo, self._encode(todo)):
                self._cache[t] = e
        out = torch.stack([self._cache[t] for t in items]) if items else self.canon[:0]
        return out[0] if single else out

    def _encode(self, texts: List[str]) -> Tensor:
        with torch.no_grad():
            e = torch.as_tensor(self.encoder.encode(texts))
        if e.ndim != 2 or e.shape[0] != len(texts):
            raise ValueError(f"text encoder returned {tuple(e.shape)} for {len(texts)} texts; expected [n, D]")
        return F.normalize(e.detach().float(), dim=-1)


# ------------------------------------------------------------------------------------------
# relevancy

def relevancy_from_scores(pos_scores: Tensor, canon_scores: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """``pos_scores [..., Q]`` (cosines with the queries), ``canon_scores [..., C]`` ->
    relevancy ``[..., Q]``."""
    worst = canon_scores.amax(dim=-1, keepdim=True)
    return torch.sigmoid(temperature * (pos_scores - worst))


def relevancy(feats: Tensor, pos: Tensor, canon: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """LERF relevancy of features ``[..., D]`` (L2-normalised) for a query ``pos [D]`` ->
    ``[...]``, or for queries ``[Q, D]`` -> ``[..., Q]``; ``canon [C, D]``. Embeddings are
    used as given (normalise them first)."""
    if feats.shape[-1] != pos.shape[-1] or canon.shape[-1] != pos.shape[-1] or canon.ndim != 2:
        raise ValueError(f"relevancy: feats {tuple(feats.shape)}, pos {tuple(pos.shape)} and canon "
                         f"{tuple(canon.shape)} must share the last dimension; canon is [C, D]")
    single = pos.ndim == 1
    P = pos[None] if single else pos
    P = P.to(feats.dtype)
    E = torch.cat([P, canon.to(feats.dtype)])
    s = feats @ E.t()
    r = relevancy_from_scores(s[..., :P.shape[0]], s[..., P.shape[0]:], temperature)
    return r[..., 0] if single else r


def decode_scores(decoder: Decoder, z: Tensor, emb: Tensor) -> Tensor:
    """Cosines of decoded latents ``z [n, L]`` with embeddings ``emb [K, D]`` -> ``[n, K]``.

    ``decoder``: a :class:`~langfield.autoencoder.SceneAutoencoder` (its fused
    ``decode_scores``), any module/callable mapping ``[n, L] -> [n, D]`` (normalised here), or
    None when ``z`` already holds features."""
    if decoder is None:
        f = z
    elif hasattr(decoder, "decode_scores"):
        return decoder.decode_scores(z, emb).float()
    elif hasattr(decoder, "decode"):
        f = decoder.decode(z)
    else:
        f = decoder(z)
    f = F.normalize(f.float(), dim=-1)
    return f @ emb.to(f.device, f.dtype).t()


def _decoder_device(decoder: Decoder, fallback: torch.device) -> torch.device:
    if isinstance(decoder, torch.nn.Module):
        for p in decoder.parameters():
            return p.device
    return fallback


def _embeddings(text_emb: Tensor, canon_emb: Tensor) -> Tuple[Tensor, int, bool]:
    text_emb = torch.as_tensor(text_emb)
    single = text_emb.ndim == 1
    P = text_emb[None] if single else text_emb
    canon_emb = torch.as_tensor(canon_emb)
    if P.ndim != 2 or canon_emb.ndim != 2 or P.shape[-1] != canon_emb.shape[-1] or not len(canon_emb):
        raise ValueError(f"text_emb {tuple(text_emb.shape)} must be [D] or [Q, D] and canon_emb "
                         f"{tuple(canon_emb.shape)} [C>=1, D] with the same D")
    E = F.normalize(torch.cat([P.float(), canon_emb.float().to(P.device)]), dim=-1)
    return E, P.shape[0], single


@torch.no_grad()
def _score_rows(z: Tensor, decoder: Decoder, E: Tensor, Q: int, temperature: float, chunk: int,
                out: Tensor) -> None:
    """Relevancy of rows ``z [n, L]`` into ``out [n, Q]``, ``chunk`` rows at a time."""
    dev = _decoder_device(decoder, z.device)
    E = E.to(dev)
    for i in range(0, z.shape[0], chunk):
        s = decode_scores(decoder, z[i:i + chunk].to(dev, non_blocking=True), E)
        out[i:i + chunk] = relevancy_from_scores(s[:, :Q], s[:, Q:], temperature).to(out.device)


# ------------------------------------------------------------------------------------------
# 2D

def split_levels(render: Tensor, n_levels: int) -> Dict[int, Tensor]:
    """``[H, W, n_levels * L]`` (all levels rendered in one pass) -> ``{level: [H, W, L]}``."""
    if render.shape[-1] % n_levels:
        raise ValueError(f"split_levels: {render.shape[-1]} channels do not split into {n_levels} levels")
    return {i: t for i, t in enumerate(render.chunk(n_levels, dim=-1))}


def _as_level_dict(latent_maps) -> Dict[Hashable, Tensor]:
    if isinstance(latent_maps, Mapping):
        d = dict(latent_maps)
    elif isinstance(latent_maps, Tensor):
        d = {0: latent_maps}
    else:
        d = {i: t for i, t in enumerate(latent_maps)}
    if not d:
        raise ValueError("latent_maps: no levels")
    shapes = set()
    for k, t in d.items():
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
            d[k] = t
        if t.ndim != 3:
            raise ValueError(f"latent map of level {k!r}: expected [H, W, L], got {tuple(t.shape)}")
        shapes.add(tuple(t.shape))
    if len(shapes) != 1:
        raise ValueError(f"latent maps differ in shape across levels: {sorted(shapes)}")
    return d


@torch.no_grad()
def relevancy_maps(latent_maps: Union[Mapping[Hashable, Tensor], Sequence[Tensor], Tensor], decoder: Decoder,
                   text_emb: Tensor, canon_emb: Tensor, *, temperature: float = TEMPERATURE, chunk: int = 65536,
                   valid: Optional[Tensor] = None, stride: int = 1) -> Tuple[Tensor, List[Hashable]]:
    """The decode pass: ``{level: [H, W, L]}`` -> relevancy ``[Q, levels, H, W]`` (float32,
    on the maps' device) and the level keys in order. ``text_emb`` is ``[D]`` (then Q = 1) or
    ``[Q, D]``. ``valid [H, W]`` (bool, e.g. rendered alpha > 0.5) restricts decoding to those
    pixels; the others get relevancy 0.

    ``stride`` > 1 (opt-in, approximate; for interactive use): the latents are averaged over
    ``stride`` x ``stride`` blocks, decoded there (``stride**2`` times less decoding), and the
    relevancy is upsampled bilinearly to full resolution. The 29x29 smoothing that follows
    hides most of the difference; mask edges get softer."""
    maps = _as_level_dict(latent_maps)
    H, W, L = next(iter(maps.values())).shape
    stride = int(stride)
    if stride > 1:
        small = {k: F.avg_pool2d(v.permute(2, 0, 1)[None].float(), stride, ceil_mode=True)[0].permute(1, 2, 0)
                 for k, v in maps.items()}
        sv = None
        if valid is not None:
            sv = F.max_pool2d(valid.reshape(1, 1, H, W).float(), stride, ceil_mode=True)[0, 0] > 0
        rel, keys = relevancy_maps(small, decoder, text_emb, canon_emb, temperature=temperature, chunk=chunk,
                                   valid=sv)
        rel = F.interpolate(rel, size=(H, W), mode="bilinear", align_corners=False)
        if valid is not None:
            rel = rel * valid.to(rel.device).reshape(1, 1, H, W)
        return rel, keys
    E, Q, _ = _embeddings(text_emb, canon_emb)
    keys = list(maps)
    dev = next(iter(maps.values())).device
    out = torch.zeros(Q, len(keys), H * W, dtype=torch.float32, device=dev)
    idx = None
    if valid is not None:
        if tuple(valid.shape[-2:]) != (H, W):
            raise ValueError(f"valid {tuple(valid.shape)} does not match the maps' {H}x{W}")
        idx = valid.reshape(-1).to(dev).bool().nonzero().squeeze(1)
    for li, k in enumerate(keys):
        z = maps[k].reshape(H * W, L)
        if idx is not None:
            z = z[idx]
        r = torch.empty(z.shape[0], Q, dtype=torch.float32, device=dev)
        _score_rows(z, decoder, E, Q, temperature, int(chunk), r)
        if idx is None:
            out[:, li] = r.t()
        else:
            out[:, li, idx] = r.t()
    return out.reshape(Q, len(keys), H, W), keys


def box_filter(x: Tensor, size: int) -> Tensor:
    """Mean over ``size`` x ``size`` windows of ``[..., H, W]`` with reflected borders
    (as OpenCV's default, BORDER_REFLECT_101); ``size`` <= 1 returns ``x``. Odd sizes are
    centred; an even size has one more pixel before than after; borders are replicated
    instead when an axis is not longer than the half-window. Running sums, O(1) per pixel
    whatever the size: the native renderer's ``lf_box_filter`` (double sums: the exact means
    rounded to float32) on CPU and CUDA tensors, else (and when a gradient is wanted, which
    the native filter does not give) :func:`box_filter_torch`."""
    if size <= 1:
        return x
    from langfield.render._build import native_available

    use_native = (x.device.type in ("cpu", "cuda") and x.numel() > 0
                  and not (x.requires_grad and torch.is_grad_enabled()))
    if use_native and native_available(x.device.type, warn=False):
        from langfield.render import native

        return native.box_filter(x, size)
    return box_filter_torch(x, size)


def box_filter_torch(x: Tensor, size: int) -> Tensor:
    """:func:`box_filter` in torch (any device): running sums along each axis, the second on
    the transposed map so that both run along contiguous memory. The prefix sums are float32
    over each row minus the row's mean, so they keep float32's precision (error ~1e-7 against
    the exact window means for maps in [0, 1])."""
    if size <= 1:
        return x
    shape = x.shape
    H, W = shape[-2:]
    t = x.reshape(-1, 1, H, W).float()
    a, b = (size - 1) // 2, size // 2
    mode = "reflect" if (H > max(a, b) and W > max(a, b)) else "replicate"
    t = F.pad(t, (b, a, b, a), mode=mode)[:, 0]
    t = _window_sums(t, size).transpose(-1, -2).contiguous()  # horizontal, then vertical
    t = _window_sums(t, size) * (1.0 / (size * size))
    return t.transpose(-1, -2).contiguous().reshape(shape)


def _window_sums(t: Tensor, size: int) -> Tensor:
    """Sums of ``size`` consecutive values along the last axis (length n -> n - size + 1)."""
    m = t.mean(-1, keepdim=True)
    c = F.pad((t - m).cumsum(-1), (1, 0))
    return (c[..., size:] - c[..., :-size]) + m * size


def majority_filter(mask: Tensor, size: int) -> Tensor:
    """A pixel of ``mask [..., H, W]`` is kept where more than half of its ``size`` x ``size``
    window (clipped at the borders) is set; ``size`` <= 1 returns the mask."""
    if size <= 1:
        return mask.bool()
    shape = mask.shape
    H, W = shape[-2:]
    t = mask.reshape(-1, 1, H, W).float()
    p = size // 2
    frac = F.avg_pool2d(t, size, stride=1, padding=p, count_include_pad=False)
    frac = frac[..., :H, :W]
    return (frac > 0.5).reshape(shape)


def normalize_map(m: Tensor) -> Tensor:
    """LangSplat's normalisation of a relevancy map ``[..., H, W]``:
    ``clip(2 (m - min) / (max - min) - 1, 0, 1)`` per map (a flat map gives zeros)."""
    return _normalize_map_(m.clone())


def _normalize_map_(m: Tensor) -> Tensor:
    """:func:`normalize_map` in place (no new full-size tensors: on CPU each costs page faults)."""
    flat = m.flatten(-2)
    lo, hi = flat.amin(-1), flat.amax(-1)  # (two passes beat torch.aminmax's one on CPU)
    scale = (2.0 / (hi - lo + 1e-9))[..., None, None]
    return m.sub_(lo[..., None, None]).mul_(scale).sub_(1.0).clamp_(0.0, 1.0)


@dataclass
class QueryResult:
    """One query on one view. Per-level tensors are ``[levels, H, W]`` in ``levels`` order."""
    levels: List[Hashable]
    relevancy: Tensor  # [levels, H, W] raw relevancy in [0, 1]
    smoothed: Tensor  # [levels, H, W] mean-filtered relevancy
    scores: Tensor  # [levels] maximum of each smoothed map
    level: Hashable  # the chosen level (key)
    level_index: int
    point: Tuple[int, int]  # (x, y) = (column, row) of the chosen smoothed map's maximum
    heatmaps: Tensor  # [levels, H, W] normalised maps in [0, 1]
    masks: Tensor  # [levels, H, W] bool
    threshold: float = 0.4
    text: Optional[str] = None

    @property
    def heatmap(self) -> Tensor:
        return self.heatmaps[self.level_index]

    @property
    def mask(self) -> Tensor:
        return self.masks[self.level_index]

    @property
    def best(self) -> Tensor:
        """The chosen level's raw relevancy ``[H, W]``."""
        return self.relevancy[self.level_index]


LEVEL_TIE = 1e-5  # smoothed level scores closer than this to the best are a tie (first level wins)


def auto_smooth(height: int, width: int) -> int:
    """LangSplat's 29-pixel mean filter scaled to the image (see the module docstring)."""
    k = int(round(29 * min(height, width) / 728.0))
    k = k if k % 2 else k + 1
    return max(3, min(29, k)) if min(height, width) < 728 else 29


def result_from_maps(rel: Tensor, levels: Optional[Sequence[Hashable]] = None, *, smooth: Optional[int] = None,
                     mask_blend: float = 0.5, threshold: float = 0.4, majority: int = 0,
                     text: Optional[str] = None) -> QueryResult:
    """Post-processing of one query's relevancy ``[levels, H, W]`` (see the module docstring)."""
    if rel.ndim == 2:
        rel = rel[None]
    if rel.ndim != 3:
        raise ValueError(f"result_from_maps: expected [levels, H, W], got {tuple(rel.shape)}")
    levels = list(range(rel.shape[0])) if levels is None else list(levels)
    if len(levels) != rel.shape[0]:
        raise ValueError(f"{len(levels)} level keys for {rel.shape[0]} maps")
    rel = rel.float()
    if smooth is None:
        smooth = auto_smooth(rel.shape[-2], rel.shape[-1])
    smoothed = box_filter(rel, smooth)
    scores = smoothed.flatten(1).amax(1)
    # the highest score; levels within LEVEL_TIE of it count as tied and the first one wins, so
    # that float rounding (a fused pass against decoded maps, one backend against another)
    # does not flip the choice between levels that score the same
    tied = torch.nonzero(scores >= scores.max() - LEVEL_TIE)
    li = int(tied[0, 0]) if len(tied) else int(torch.argmax(scores))  # (no candidate: NaN scores)
    W = rel.shape[-1]
    flat = int(torch.argmax(smoothed[li]))
    point = (flat % W, flat // W)
    blended = (smoothed * mask_blend).add_(rel, alpha=1.0 - mask_blend) if mask_blend else rel.clone()
    heat = _normalize_map_(blended)
    masks = majority_filter(heat > threshold, majority)
    return QueryResult(levels=levels, relevancy=rel, smoothed=smoothed, scores=scores, level=levels[li],
                       level_index=li, point=point, heatmaps=heat, masks=masks, threshold=threshold, text=text)


@torch.no_grad()
def query_maps(latent_maps: Union[Mapping[Hashable, Tensor], Sequence[Tensor], Tensor], decoder: Decoder,
               text_emb: Tensor, canon_emb: Tensor, *, temperature: float = TEMPERATURE,
               smooth: Optional[int] = None, mask_blend: float = 0.5, threshold: float = 0.4, majority: int = 0,
               chunk: int = 65536,
               valid: Optional[Tensor] = None, stride: int = 1, texts: Optional[Sequence[str]] = None,
               ) -> Union[QueryResult, List[QueryResult]]:
    """Text -> relevancy maps, level, localisation point and mask on one rendered view.

    ``latent_maps``: ``{level: [H, W, L]}`` (or a list, or one ``[H, W, L]`` map), rendered
    language latents; ``decoder``: the scene autoencoder (or a callable, or None when the maps
    hold CLIP features); ``text_emb [D]`` -> one :class:`QueryResult`, ``[Q, D]`` -> a list
    of Q (all queries share one decode pass); ``canon_emb [C, D]``. ``chunk`` pixels are decoded
    at a time (memory ~ chunk x 1.5 kB with LangSplat's decoder); ``valid`` and ``stride``:
    see :func:`relevancy_maps`."""
    rel, keys = relevancy_maps(latent_maps, decoder, text_emb, canon_emb, temperature=temperature, chunk=chunk,
                               valid=valid, stride=stride)
    res = results_from_relevancy(rel, keys, smooth=smooth, mask_blend=mask_blend, threshold=threshold,
                                 majority=majority, texts=texts)
    return res[0] if torch.as_tensor(text_emb).ndim == 1 else res


def results_from_relevancy(rel: Tensor, keys: Sequence[Hashable], *, smooth: Optional[int] = None,
                           mask_blend: float = 0.5, threshold: float = 0.4, majority: int = 0,
                           texts: Optional[Sequence[str]] = None) -> List[QueryResult]:
    """:func:`result_from_maps` of every query of a relevancy stack ``[Q, levels, H, W]`` (what
    :func:`relevancy_maps` returns, or a codebook field's fused pass) -> Q results."""
    return [result_from_maps(rel[q], keys, smooth=smooth, mask_blend=mask_blend, threshold=threshold,
                             majority=majority, text=None if texts is None else texts[q])
            for q in range(rel.shape[0])]


# ------------------------------------------------------------------------------------------
# 3D

@dataclass
class Selection:
    mask: Tensor  # [N] bool
    scores: Tensor  # [N] relevancy of the chosen level (or the maximum over levels)
    level: Optional[int]  # chosen level index; None with level="max"
    level_scores: Tensor  # [levels, N] relevancy per level

    @property
    def indices(self) -> Tensor:
        return self.mask.nonzero().squeeze(1)

    def __iter__(self):  # mask, scores = select_gaussians(...)
        return iter((self.mask, self.scores))


def _lang_levels(lang: Tensor, decoder: Decoder, n_levels: Optional[int]) -> Tensor:
    if lang.ndim == 3:
        return lang
    if lang.ndim != 2:
        raise ValueError(f"lang: expected [N, levels, L] or [N, levels*L], got {tuple(lang.shape)}")
    L = getattr(decoder, "latent_dim", None)
    if n_levels is not None:
        if lang.shape[1] % n_levels:
            raise ValueError(f"lang has {lang.shape[1]} channels, not a multiple of n_levels={n_levels}")
        return lang.reshape(lang.shape[0], n_levels, lang.shape[1] // n_levels)
    if L is None:
        return lang[:, None]
    if lang.shape[1] % L:
        raise ValueError(f"lang has {lang.shape[1]} channels, not a multiple of the latent size {L}")
    return lang.reshape(lang.shape[0], lang.shape[1] // L, L)


@torch.no_grad()
def select_gaussians(lang: Tensor, decoder: Decoder, text_emb: Tensor, canon_emb: Tensor, *,
                     level: Union[int, str, None] = None, threshold: float = 0.4, normalize: bool = True,
                     temperature: float = TEMPERATURE, n_levels: Optional[int] = None, topk: int = 32,
                     chunk: int = 65536) -> Union[Selection, List[Selection]]:
    """Score every Gaussian's decoded latent for a query and select those above ``threshold``.

    ``lang``: ``[N, levels, L]``, ``[N, levels * L]`` (split by the decoder's ``latent_dim`` or
    ``n_levels``) or ``[N, L]`` (one level). ``text_emb``: ``[D]`` -> one :class:`Selection`;
    ``[Q, D]`` -> a list of Q (one decode pass for all). ``level``: an index; None picks the
    level whose ``topk`` best Gaussians have the highest mean relevancy (the 3D analogue of the
    2D choice, robust to a single stray Gaussian); ``"max"`` takes each Gaussian's best level.
    ``normalize=True`` (default): the scores are normalised like the 2D maps
    (``clip(2 (s - min) / (max - min) - 1, 0, 1)`` over the Gaussians) and ``threshold`` (0.4,
    the 2D mask threshold) applies to that, which does not depend on how close the text
    encoder's embeddings sit to each other; ``normalize=False``: ``threshold`` applies to the
    raw relevancy (0.5 = as close to the query as to the nearest canonical phrase, which with
    CLIP-like embeddings selects far too much; use e.g. 0.8). ``mask, scores = selection``
    unpacks."""
    lv = _lang_levels(torch.as_tensor(lang), decoder, n_levels)
    N, nl, L = lv.shape
    E, Q, single = _embeddings(text_emb, canon_emb)
    if level not in (None, "max") and not -nl <= int(level) < nl:
        raise ValueError(f"level {level} out of range for {nl} levels")
    names = range(nl) if level is None or level == "max" else [int(level) % nl]
    per = torch.zeros(Q, nl, N, dtype=torch.float32, device=lv.device)
    for li in names:
        r = torch.empty(N, Q, dtype=torch.float32, device=lv.device)
        _score_rows(lv[:, li], decoder, E, Q, temperature, int(chunk), r)
        per[:, li] = r.t()
    out = []
    for q in range(Q):
        pq = per[q]
        if level == "max":
            chosen, scores = None, pq.amax(0)
        elif level is None:
            k = max(1, min(int(topk), N))
            chosen = int(torch.argmax(pq.topk(k, dim=1).values.mean(1))) if N else 0
            scores = pq[chosen]
        else:
            chosen = int(level) % nl
            scores = pq[chosen]
        sc = normalize_map(scores[None, None, :])[0, 0] if normalize and N else scores
        out.append(Selection(mask=sc > threshold, scores=scores, level=chosen, level_scores=pq))
    return out[0] if single else out


def recolor(colors: Tensor, mask: Tensor, color: Sequence[float] = (1.0, 0.0, 0.0), *, blend: float = 1.0,
            dim: Optional[float] = None, sh0: bool = False) -> Tensor:
    """A copy of per-Gaussian ``colors`` (``[N, 3]`` or ``[N, 1, 3]``) with the ``mask``-ed
    ones moved towards ``color`` by ``blend`` (1: painted) and, if ``dim`` is given, the others
    multiplied by ``dim`` (e.g. 0.3). ``sh0=True``: the values are SH DC coefficients (gsplat's
    ``sh0``, RGB = 0.5 + C0 * sh0); the edit is made in RGB and converted back."""
    c = colors.detach().clone()
    rgb = c * SH_C0 + 0.5 if sh0 else c
    target = torch.as_tensor(color, dtype=rgb.dtype, device=rgb.device)
    m = mask.to(rgb.device).bool()
    if m.shape[0] != rgb.shape[0]:
        raise ValueError(f"mask has {m.shape[0]} entries for {rgb.shape[0]} Gaussians")
    mm = m.reshape(-1, *([1] * (rgb.ndim - 1)))
    out = torch.where(mm, rgb + blend * (target - rgb), rgb)
    if dim is not None:
        out = torch.where(mm, out, out * dim)
    return (out - 0.5) / SH_C0 if sh0 else out


# ------------------------------------------------------------------------------------------
# pictures

# Google's polynomial approximation of the turbo colour map (Apache-2.0), x in [0, 1]:
# channel = sum_k a_k x^k, k = 0..5.
_TURBO_POLY = (
    (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
    (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
    (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
)


def _turbo_lut(n: int = 256) -> Tensor:
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    powers = torch.stack([x ** k for k in range(6)], -1)  # [n, 6]
    return (powers @ torch.tensor(_TURBO_POLY, dtype=torch.float64).t()).clamp(0, 1).float()


TURBO = _turbo_lut()


def colormap(values: Tensor, vmin: Optional[float] = None, vmax: Optional[float] = None) -> Tensor:
    """``[...]`` -> turbo colours ``[..., 3]`` in [0, 1]; the range defaults to the values'."""
    v = values.float()
    lo = v.min() if vmin is None else torch.as_tensor(vmin, dtype=v.dtype)
    hi = v.max() if vmax is None else torch.as_tensor(vmax, dtype=v.dtype)
    t = ((v - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    idx = (t * (len(TURBO) - 1)).round().long()
    return TURBO.to(v.device)[idx]


def _rgb_float(img: Tensor) -> Tensor:
    img = torch.as_tensor(img)
    if img.dtype == torch.uint8:
        return img.float() / 255.0
    return img.float().clamp(0, 1)


def heatmap_overlay(rgb: Tensor, relevancy: Tensor, alpha: float = 0.6, *, mask: Optional[Tensor] = None,
                    dim: float = 0.3, vmin: Optional[float] = None, vmax: Optional[float] = None) -> Tensor:
    """The image ``rgb [H, W, 3]`` (float in [0, 1] or uint8) with the turbo-coloured
    ``relevancy [H, W]`` blended over it at ``alpha``; with a ``mask``, only inside it, and the
    pixels outside darkened to ``dim`` x the image (LERF/LangSplat's look). -> float
    ``[H, W, 3]`` in [0, 1]."""
    img = _rgb_float(rgb)
    if img.ndim != 3 or img.shape[-1] != 3 or tuple(relevancy.shape) != tuple(img.shape[:2]):
        raise ValueError(f"heatmap_overlay: rgb {tuple(img.shape)} must be [H, W, 3] and relevancy "
                         f"{tuple(relevancy.shape)} [H, W]")
    col = colormap(relevancy.to(img.device), vmin, vmax)
    out = (1.0 - alpha) * img + alpha * col
    if mask is not None:
        m = mask.to(img.device).bool()[..., None]
        out = torch.where(m, out, img * dim)
    return out.clamp(0, 1)


def save_png(path: Union[str, os.PathLike], img: Tensor) -> None:
    """Write ``[H, W, 3]`` / ``[H, W]`` (float in [0, 1], bool or uint8) as a PNG, atomically."""
    import io

    import numpy as np
    from PIL import Image

    from langfield.io.checkpoint import atomic_write_bytes

    t = torch.as_tensor(img).detach().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8) * 255
    elif t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim not in (2, 3):
        raise ValueError(f"save_png: expected [H, W] or [H, W, 3], got {tuple(t.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(t.numpy())).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
