"""Sparse-codebook language codec (LangSplatV2-style): no decoder at query time.

A global **codebook** ``C [L, in_dim]`` of L unit CLIP-space vectors (one codebook shared by all
levels, as LangSplatV2 shares its global dictionary) and, per Gaussian and level, **sparse
coefficients** ``w [L]`` with at most ``topk`` non-zero entries, non-negative and summing to 1.
The renderer blends the coefficients like any channels (dense L channels, or the sparse
``(index, weight)`` path of :mod:`langfield.render.sparse`), so a pixel's coefficient vector
``z [L]`` is a convex-like mix of the Gaussians' sparse weights, and the pixel's CLIP feature is
``normalize(z @ C)``. A text query never materialises per-pixel 512-D features:
``<normalize(z C), e> = z (C e) / sqrt(z G z)`` with ``G = C C^T [L, L]`` (:meth:`decode_scores`).

What the Gaussians store (``lang``, ``levels * L`` channels): the **weights themselves**, already
sparse (k non-zeros per level, on the probability simplex), so every consumer that renders
``lang`` as-is (queries, eval, viewer, export, 3D selection) gets the right coefficients
unchanged. The language stage (``codebook_train="sparse"``, the default) starts every Gaussian
from the views (:meth:`CodebookCodec.init_weights`: the top-k entries nearest to the mean target
of the pixels it covers) and trains its k weights per level through the sparse pass
(:func:`langfield.render.sparse.render_sparse`), projected back onto the simplex after every
step; the entries stay. ``codebook_train="dense"`` trains the coefficients as free tensors
(dense L channels per level, so every entry gets its gradient) kept on the simplex with
:meth:`CodebookCodec.project_` after every optimiser step: the Euclidean projection onto the
simplex during the first half of the steps (entries can still enter a Gaussian's support), then
onto its k-sparse part (top-k of each level's vector, those k values projected, the rest 0), so
the final weights have k non-zeros. :meth:`activate` is the logits view of the same set (top-k of the logits,
softmax over them): ``activate(log(w)) == w`` for projected weights.

Fitting (:meth:`CodebookCodec.fit`): the codebook is **k-means** (spherical, k-means++ seeding,
cosine assignment, normalised means) of the cached features of every level, and **fixed
afterwards** (LangSplatV2 learns it jointly; here the per-Gaussian coefficients are the only
trained tensors, which keeps the language stage's resume exact and the codebook a pure function
of the features and the seed). ``targets(x)`` are the L2-normalised features themselves
(``target_dim = in_dim``) and :meth:`loss` is LangSplatV2's loss in CLIP space: the decoded
render against the target, ``|f - t|_1 + (1 - cos(f, t))`` averaged over the valid pixels. The
language stage trains with :meth:`loss_projected`, the cosine term alone (half the squared L2
distance of the unit features) computed exactly in the codebook's coordinates: a target is its
``L`` dot products with the entries (:meth:`project_targets`), ``cos = z (C t) / sqrt(z G z)``, so
no step makes ``in_dim``-sized features (1/3 of the CPU time per step at L=16; tabletop 96x96:
the same mIoU / localisation as the L1 + cosine loss).

Files: ``save(path)`` writes ``<stem>.safetensors`` (the codebook) + ``<stem>.json``
(configuration and fit report) atomically through :mod:`langfield.io.checkpoint`; no pickle.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from langfield.codec.base import CodecError

__all__ = ["CodebookCodec", "kmeans_codebook", "project_topk_simplex", "topk_softmax"]

FORMAT = "langfield-codebook"
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------
# sparse weights

def project_topk_simplex(v: Tensor, k: int) -> Tensor:
    """Each row of ``v [..., L]`` -> its nearest point (Euclidean, among the rows' top-k
    entries) on the probability simplex with at most ``k`` non-zeros: the ``k`` largest entries
    are projected onto the simplex (sort-based, exact), the others become 0. A row of equal
    values keeps ``k`` of its entries (``torch.topk``'s pick) at ``1/k``. NaN and -inf count as
    very small (-1e30), +inf as very large (1e30)."""
    L = v.shape[-1]
    k = max(1, min(int(k), L))
    x = torch.nan_to_num(v.float(), nan=-1e30, posinf=1e30, neginf=-1e30)
    if k == L:  # every entry: the threshold from the sorted row, then the row itself
        top = torch.sort(x, dim=-1, descending=True).values
        lead, theta = _simplex_threshold(top)
        return ((x - lead) - theta).clamp_min_(0).to(v.dtype)
    top, idx = torch.topk(x, k, dim=-1, sorted=True)  # descending
    lead, theta = _simplex_threshold(top)
    out = torch.zeros_like(x)
    out.scatter_(-1, idx, ((top - lead) - theta).clamp_min_(0))
    return out.to(v.dtype)


def _simplex_threshold(top: Tensor) -> Tuple[Tensor, Tensor]:
    """The Euclidean projection onto the probability simplex of rows sorted in descending order
    (Held et al. / Duchi et al.), as ``(lead, theta)`` [..., 1] with the projection
    ``max(x - lead - theta, 0)``: ``lead`` is the row's largest entry, and on the shifted row
    ``u = top - lead`` (``u_1 = 0``), with ``c_j`` the sum of the ``j`` largest minus 1,
    ``theta = c_rho / rho`` for the count ``rho`` of the ``j`` where ``u_j > c_j / j`` (a prefix;
    ``j = 1`` holds exactly after the shift, also for entries so large that ``u_1 - 1`` would
    round to ``u_1``). One sort and a few passes, without the per-iteration syncs of an
    active-set loop (Michelot's, used before: about 2x the time for the rows of 4 that sparse
    codebook training projects every step)."""
    k = top.shape[-1]
    lead = top[..., :1]
    u = top - lead
    css = u.cumsum(-1).sub_(1.0)
    r = torch.arange(1, k + 1, device=top.device, dtype=top.dtype)
    rho = (u - css / r > 0).sum(-1, keepdim=True).clamp_min_(1)
    return lead, css.gather(-1, rho - 1) / rho.to(top.dtype)


def topk_softmax(logits: Tensor, k: int) -> Tensor:
    """Sparse top-k softmax over the last axis: the ``k`` largest logits get softmax weights
    (summing to 1), the rest 0. ``[..., L] -> [..., L]``."""
    L = logits.shape[-1]
    k = max(1, min(int(k), L))
    top, idx = torch.topk(logits, k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))


# ------------------------------------------------------------------------------------------
# k-means

def kmeans_codebook(x: Tensor, L: int, *, iters: int = 30, seed: int = 0) -> Tuple[Tensor, Dict[str, Any]]:
    """Spherical k-means of unit rows ``x [M, D]`` into ``L`` unit centres (k-means++ seeding
    from a seeded generator, cosine assignment, normalised means; an empty cluster is re-seeded
    at the point worst served by its centre). Deterministic for a seed on one device.
    Returns ``(centres [L, D], {"iters", "mean_cos"})``."""
    M, D = x.shape
    g = torch.Generator(device="cpu").manual_seed(int(seed) + 0xC0DE)
    dev = x.device
    first = int(torch.randint(M, (1,), generator=g))
    centres = [x[first]]
    best = (x @ x[first]).clamp(-1, 1)  # max cosine to a chosen centre
    for _ in range(1, L):
        d2 = (2.0 - 2.0 * best).clamp_min(0)  # squared chord distance of unit vectors
        tot = float(d2.sum())
        if tot <= 1e-12:  # fewer distinct points than centres: repeat points (re-seeded below)
            j = int(torch.randint(M, (1,), generator=g))
        else:
            u = float(torch.rand((), generator=g)) * tot
            j = int(torch.searchsorted(d2.double().cumsum(0), torch.tensor([u], dtype=torch.float64,
                                                                           device=dev)).clamp_max(M - 1))
        centres.append(x[j])
        best = torch.maximum(best, (x @ x[j]).clamp(-1, 1))
    C = torch.stack(centres)
    it = 0
    for it in range(1, iters + 1):
        sims = x @ C.t()  # [M, L]
        s, a = sims.max(-1)
        newC = torch.zeros_like(C).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=L)
        empty = (counts == 0).nonzero().reshape(-1)
        if len(empty):
            order = torch.argsort(s)  # worst-served points first
            newC[empty] = x[order[:len(empty)]] if M >= len(empty) else x[order].repeat(len(empty), 1)[:len(empty)]
        newC = F.normalize(newC, dim=-1)
        shift = float((newC - C).abs().max())
        C = newC
        if shift < 1e-6 and not len(empty):
            break
    mean_cos = float((x @ C.t()).max(-1).values.mean())
    return C, {"iters": it, "mean_cos": mean_cos}


# ------------------------------------------------------------------------------------------

class CodebookCodec(nn.Module):
    """The sparse-codebook codec (see the module docstring). ``codebook [L, in_dim]`` (unit
    rows) is a frozen parameter; ``topk`` the non-zeros per Gaussian and level."""

    kind = "codebook"

    def __init__(self, codebook: Tensor, topk: int = 4, temperature: float = 0.05, dense_until: float = 0.5):
        super().__init__()
        codebook = torch.as_tensor(codebook)
        if codebook.ndim != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
            raise CodecError(f"codebook: expected [L, in_dim], got {tuple(codebook.shape)}")
        if not 1 <= int(topk) <= codebook.shape[0]:
            raise CodecError(f"codebook: topk must be in 1..{codebook.shape[0]} (the codebook size), got {topk}")
        if not bool(torch.isfinite(codebook).all()):
            raise CodecError("codebook: non-finite entries")
        self.codebook = nn.Parameter(F.normalize(codebook.float(), dim=-1), requires_grad=False)
        self.topk = int(topk)
        self.temperature = float(temperature)
        self.dense_until = float(dense_until)
        self.report: Dict[str, Any] = {}

    # -- shapes ---------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def latent_dim(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def target_dim(self) -> int:
        return self.in_dim

    # -- sparse weights -------------------------------------------------------------------
    def activate(self, logits: Tensor) -> Tensor:
        """Per-level logits ``[..., n*L]`` (or ``[..., L]``) -> sparse top-k softmax weights."""
        L = self.latent_dim
        if logits.shape[-1] % L:
            raise ValueError(f"activate: {logits.shape[-1]} channels are not a multiple of the codebook size {L}")
        x = logits.reshape(*logits.shape[:-1], -1, L)
        return topk_softmax(x, self.topk).reshape(logits.shape)

    @torch.no_grad()
    def project_(self, lang: Tensor, progress: float = 1.0) -> Tensor:
        """In place: every level of ``lang [N, n*L]`` onto the probability simplex, k-sparse once
        ``progress`` (the training's step / steps) reaches ``dense_until`` (0.5), dense (all L
        entries may be non-zero; the Euclidean projection zeroes many) before. The language stage
        calls it once on the fresh (zero) coefficients with ``progress=0`` (-> uniform 1/L: a zero
        render would give the CLIP-space loss a 1/eps gradient that stalls Adam for thousands of
        steps) and after every optimiser step with ``step / steps`` (so entries can enter a
        Gaussian's support while the field forms; the final weights are k-sparse). Deterministic
        in the step, so a resumed stage projects exactly as an uninterrupted one. Returns ``lang``."""
        L = self.latent_dim
        if lang.shape[-1] % L:
            raise ValueError(f"project_: {lang.shape[-1]} channels are not a multiple of the codebook size {L}")
        k = self.topk if float(progress) >= self.dense_until else L
        x = lang.reshape(*lang.shape[:-1], -1, L)
        lang.copy_(project_topk_simplex(x, k).reshape(lang.shape))
        return lang

    @torch.no_grad()
    def init_weights(self, mean_tc: Tensor, seen: Tensor) -> Tensor:
        """Starting coefficients from the views: ``mean_tc [N, n*L]`` is, per Gaussian and level,
        the blend-weighted mean over the training pixels it covers of their projected targets
        (``C t^``, the cosines of the target with every entry: :meth:`project_targets`);
        ``seen [N, n]`` whether it covers any valid pixel. Each level gets :meth:`encode`'s
        recipe on those cosines (top-k softmax at ``temperature``: the k entries nearest to what
        the Gaussian shows, k non-zeros on the simplex); a Gaussian no view shows takes the mean
        of the seen ones of its level. Returns ``[N, n*L]``."""
        L = self.latent_dim
        N = mean_tc.shape[0]
        x = mean_tc.reshape(N, -1, L).float().clone()
        seen = seen.reshape(N, -1).bool()
        for li in range(x.shape[1]):
            s = seen[:, li]
            fill = x[s, li].mean(0) if bool(s.any()) else x.new_zeros(L)
            x[~s, li] = fill
        return topk_softmax(x / self.temperature, self.topk).reshape(mean_tc.shape)

    def sparse(self, lang: Tensor) -> Tuple[Tensor, Tensor]:
        """``lang [N, n*L]`` -> ``(idx int32 [N, n*k], w [N, n*k])``: the top-k (index, weight)
        pairs of every level, indices into the ``n*L`` channels (level offset included), for
        :func:`langfield.render.sparse.render_sparse`. Exact for projected weights."""
        from langfield.render.sparse import sparse_topk

        return sparse_topk(lang, self.latent_dim, self.topk)

    # -- the codec interface ----------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Features ``[..., in_dim]`` -> sparse top-k softmax weights ``[..., L]`` over the
        codebook (cosine similarities / ``temperature``)."""
        x = _check_last(x, self.in_dim, "encode")
        C = self.codebook
        s = F.normalize(x.to(C.device, C.dtype), dim=-1) @ C.t()
        return topk_softmax(s / self.temperature, self.topk)

    def decode(self, z: Tensor) -> Tensor:
        """Coefficients ``[..., L]`` -> ``normalize(z @ codebook)`` ``[..., in_dim]``."""
        z = _check_last(z, self.latent_dim, "decode")
        C = self.codebook
        return F.normalize(z.to(C.device, C.dtype) @ C, dim=-1)

    @torch.no_grad()
    def decode_scores(self, z: Tensor, emb: Tensor) -> Tensor:
        """Cosines ``<decode(z), e_k>`` for ``z [n, L]``, ``emb [K, in_dim]`` (unit rows) ->
        ``[n, K]``: ``z (C e^T) / sqrt(z G z^T)`` with ``G = C C^T``; ``L*K + L*L``
        multiply-adds per row, no ``[n, in_dim]`` features (norm clamped at 1e-12 like
        ``F.normalize``)."""
        z = _check_last(z, self.latent_dim, "decode_scores")
        C = self.codebook
        z = z.to(C.device, C.dtype).reshape(-1, self.latent_dim)
        emb = emb.to(device=C.device, dtype=C.dtype)
        A = C @ emb.t()  # [L, K]
        G = self.gram()
        dots = z @ A
        nrm = ((z @ G) * z).sum(-1).clamp_min(0).sqrt().clamp_min(1e-12)
        return dots / nrm[:, None]

    def gram(self) -> Tensor:
        """``G = C C^T [L, L]``, cached per codebook version."""
        C = self.codebook
        key = (C.data_ptr(), C.device, C._version)
        if getattr(self, "_gram_key", None) != key:
            self._gram_cache = C @ C.t()
            self._gram_key = key
        return self._gram_cache

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """2D supervision in CLIP space: the L2-normalised features."""
        x = _check_last(x, self.in_dim, "targets")
        return F.normalize(x.to(self.codebook.device, self.codebook.dtype), dim=-1)

    def loss(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """One level: rendered coefficients ``pred [H, W, L]`` decoded to CLIP space against
        ``target [H, W, in_dim]``: mean over the valid pixels of ``|f - t|_1 + 1 - cos(f, t)``
        (``f = normalize(pred @ codebook)``); 0 when no pixel is valid."""
        v = valid.reshape(-1)
        n = v.sum()
        p = pred.reshape(-1, pred.shape[-1])[v]
        if p.shape[0] == 0:
            return pred.sum() * 0.0
        t = target.reshape(-1, target.shape[-1])[v].to(pred.dtype)
        f = F.normalize(p @ self.codebook.to(pred.dtype), dim=-1)
        l1 = (f - t).abs().sum(-1)
        cos = (f * t).sum(-1) / t.norm(dim=-1).clamp_min(1e-12)
        return (l1 + (1.0 - cos)).sum() / n.clamp_min(1)

    # -- the loss in the codebook's coordinates (what the language stage trains with) -------
    @torch.no_grad()
    def project_targets(self, t: Tensor) -> Tensor:
        """Targets ``[..., in_dim]`` (:meth:`targets`) -> their dot products with the codebook
        entries ``C t^ [..., L]`` (``t^`` the unit target): all :meth:`loss_projected` needs of a
        target, ``L`` numbers instead of ``in_dim``."""
        t = _check_last(t, self.in_dim, "project_targets")
        C = self.codebook
        return F.normalize(t.to(C.device, C.dtype), dim=-1) @ C.t()

    def loss_projected(self, pred: Tensor, tc: Tensor, valid: Tensor) -> Tensor:
        """One level's cosine loss in CLIP space, ``1 - cos(normalize(z C), t)`` averaged over the
        valid pixels, computed exactly without ``in_dim``-sized features: ``cos = z (C t^) /
        sqrt(z G z)`` with ``tc = C t^`` (:meth:`project_targets`) and ``G = C C^T``. Equals half
        the squared L2 distance of the unit features (``|f - t^|^2 = 2 - 2 cos``); ``pred [H, W, L]``,
        ``tc [H, W, L]``, ``valid [H, W]``; 0 when no pixel is valid."""
        L = self.latent_dim
        v = valid.reshape(-1).to(pred.dtype)
        n = v.sum()  # no host sync on the step's path: 0 valid pixels give 0 / 1
        p = pred.reshape(-1, L)
        c = tc.reshape(-1, L).to(pred.dtype)
        G = self.gram().to(pred.dtype)
        dots = (p * c).sum(-1)
        nrm = ((p @ G) * p).sum(-1).clamp_min(1e-24).sqrt()
        return ((1.0 - dots / nrm) * v).sum() / n.clamp_min(1)

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, features: Union[Tensor, Iterable[Tensor]], *, latent_dim: int = 64, seed: int = 0,
            device: Union[str, torch.device, None] = "auto", progress: bool = False, topk: int = 4,
            steps: int = 30, max_vectors: Optional[int] = 200_000, holdout: float = 0.1,
            temperature: float = 0.05, **_ignored: Any) -> Tuple["CodebookCodec", Dict[str, Any]]:
        """k-means codebook of ``latent_dim`` entries on the features (every level of every
        training image; at most ``max_vectors``, a seeded uniform sample; ``holdout`` of them
        held out). ``steps``: k-means iterations at most (the language stage passes its
        ``ae_steps``; capped at 100). Options of other codecs (``batch_size``, ``lr``) are
        accepted and ignored. Returns ``(codec, report)``; the report holds ``train_cos`` /
        ``heldout_cos`` (mean cosine of a vector to the decoded top-k encoding)."""
        from langfield.codec.autoencoder import collect_features
        from langfield.run import resolve_device

        t0 = time.perf_counter()
        dev = resolve_device(device, error=ValueError)
        L = int(latent_dim)
        if L < 1:
            raise CodecError(f"codebook: the codebook size must be >= 1, got {L}")
        if not 1 <= int(topk) <= L:
            raise CodecError(f"codebook: --topk must be in 1..{L} (the codebook size), got {topk}")
        x = collect_features(features, max_vectors=max_vectors, seed=seed)
        M = x.shape[0]
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(M, generator=g)
        n_hold = min(int(round(M * float(holdout))), M - 1) if holdout > 0 and M > 1 else 0
        hold, train = x[perm[:n_hold]], x[perm[n_hold:]]
        iters = max(1, min(int(steps), 100))
        C, km = kmeans_codebook(train.to(dev), L, iters=iters, seed=seed)
        codec = cls(C, topk=int(topk), temperature=temperature).to(dev)
        report: Dict[str, Any] = {
            "train_cos": _recon_cos(codec, train[:200_000]), "heldout_cos": _recon_cos(codec, hold) if n_hold else None,
            "steps": int(km["iters"]), "kmeans_mean_cos": km["mean_cos"], "seconds": time.perf_counter() - t0,
            "n_train": int(len(train)), "n_heldout": int(n_hold), "latent_dim": L, "topk": int(topk),
            "seed": int(seed), "device": str(dev), "codebook": "k-means, fixed",
        }
        codec.report = report
        return codec.eval(), report

    # -- files -----------------------------------------------------------------------------
    def save(self, path: PathLike) -> str:
        """``<stem>.safetensors`` (the codebook) + ``<stem>.json``, atomically. Returns the
        ``.safetensors`` path."""
        from langfield.io.checkpoint import save_checkpoint

        cfg = {"format": FORMAT, "version": 1,
               "model": {"in_dim": self.in_dim, "latent_dim": self.latent_dim, "topk": self.topk,
                         "temperature": self.temperature, "dense_until": self.dense_until},
               "report": self.report}
        return save_checkpoint(_stem_path(path), {"codebook": self.codebook.detach().cpu().contiguous()}, config=cfg,
                               step=int(self.report.get("steps", 0)))

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "CodebookCodec":
        from langfield.io.checkpoint import CheckpointError, load_checkpoint

        ck = load_checkpoint(_stem_path(path), device="cpu")
        cfg = ck.config
        if cfg.get("format") != FORMAT:
            raise CheckpointError(f"{ck.path}: not a langfield codebook (format {cfg.get('format')!r})")
        m = cfg.get("model") or {}
        C = ck.tensors.get("codebook")
        if not isinstance(C, Tensor) or C.ndim != 2:
            raise CheckpointError(f"{ck.path}: field 'codebook': expected an [L, in_dim] tensor")
        if int(m.get("latent_dim", -1)) != C.shape[0] or int(m.get("in_dim", -1)) != C.shape[1]:
            raise CheckpointError(f"{ck.path}: field 'model': sizes {m.get('latent_dim')}x{m.get('in_dim')} do not "
                                  f"match the codebook {tuple(C.shape)}")
        try:
            codec = cls(C, topk=int(m.get("topk", 4)), temperature=float(m.get("temperature", 0.05)),
                        dense_until=float(m.get("dense_until", 0.5)))
        except CodecError as e:
            raise CheckpointError(f"{ck.path}: {e}") from None
        codec.codebook.data.copy_(C.float())  # exactly the stored values (no renormalisation drift)
        codec.report = dict(cfg.get("report") or {})
        return codec.to(device).eval()


@torch.no_grad()
def _recon_cos(codec: CodebookCodec, x: Tensor, batch: int = 65536) -> float:
    tot, n = 0.0, 0
    dev = codec.codebook.device
    for i in range(0, len(x), batch):
        xb = F.normalize(x[i:i + batch].to(dev), dim=-1)
        tot += float((codec.decode(codec.encode(xb)) * xb).sum(-1).double().sum())
        n += len(xb)
    return tot / max(n, 1)


def _stem_path(path: PathLike) -> str:
    p = os.fspath(path)
    return p if p.endswith((".safetensors", ".json")) else p + ".safetensors"


def _check_last(x: Tensor, d: int, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"{what}: expected [..., {d}], got {tuple(x.shape)}")
    return x
