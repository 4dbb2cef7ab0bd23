"""The language stage: a trained RGB run -> per-Gaussian language latents for every level.

Steps, each resumable and recorded in the run folder:

1. **Features** (``RUN/features/``): the chosen extractor (``labels``, ``sam-clip``,
   ``dense-clip``) on the training images, into a :class:`~langfield.features.FeatureCache`
   (finished images are skipped on a rerun).
2. **Scene autoencoder** (``RUN/autoencoder.safetensors`` + ``.json``): fitted once on the
   cached features of all levels (region features for sam-clip / labels, patch features for
   dense-clip); refitted only when the features or its options change.
3. **Latents** (``RUN/language/checkpoints/``): every Gaussian gets ``levels x latent_dim``
   channels (``lang``), all levels rendered in **one** rasterizer pass; the loss is the L1
   distance to the encoded 2D features, per level, over the pixels that have a feature
   (masked L1; LangSplat's loss without its three separate trainings; a codec may define its
   own loss: the codebook's is the cosine in CLIP space, its coefficients start from the views
   and train as k (index, weight) pairs per level through the sparse pass). Geometry and colour
   are frozen by default; ``joint=True`` fine-tunes them too, with the RGB loss added
   (colours and latents then come from the same pass). One training view per step, in
   seeded random order; Adam on the latents (lr 0.0025, LangSplat's).

``RUN/config.json`` gains a ``language`` section (options, levels, latent size, the feature
extractor and the text encoder queries must use, the RGB step it started from). A language
checkpoint holds all Gaussian parameters (with ``lang``), the optimiser state and the RNG
state: resuming gives the same latents bit for bit on the CPU. Afterwards, when the dataset
folder has a ``queries.json`` (``langfield scenes make`` writes one), the held-out views are
evaluated (:mod:`langfield.eval.language`) into ``RUN/metrics.json`` (``language`` key).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from langfield.codec import codec_file, fit_codec, load_codec
from langfield.io.checkpoint import atomic_write_json
from langfield.render.model import CameraCache, render
from langfield.run import RunError, RunFolder, open_dataset, resolve_device
from langfield.train.progress import Progress
from langfield.train.sampler import EpochSampler

__all__ = ["LangConfig", "LanguageTrainer", "train_language", "LANG_RESUME_MAY_CHANGE"]

FeatureKind = Literal["labels", "sam-clip", "dense-clip"]


@dataclass
class LangConfig:
    """Options of the language stage (stored in ``RUN/config.json`` under ``language.config``)."""

    features: FeatureKind = "labels"
    codec: Literal["autoencoder", "codebook"] = "autoencoder"
    """The language codec (``langfield.codec``): what each Gaussian carries and how targets,
    loss and decoding are defined."""
    steps: int = 3_000
    """Optimisation steps of the latents (one training view each)."""
    lr: float = 0.0025
    latent_dim: int = 3
    joint: bool = False
    """Fine-tune geometry and colour too (RGB loss + language loss); default: frozen."""
    rgb_weight: float = 1.0
    """With ``joint``: weight of the RGB loss next to the language L1."""
    seed: int = 0
    ckpt_every: int = 1_000
    keep_checkpoints: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: str = "auto"
    progress: Optional[bool] = None

    # autoencoder
    ae_steps: int = 3_000
    ae_batch: int = 256
    ae_lr: float = 1e-3
    ae_max_vectors: int = 1_000_000

    # extraction
    feature_split: Literal["train", "all"] = "train"
    """Images whose features are extracted and trained on (held-out views stay unseen)."""
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "laion2b_s34b_b88k"
    clip_checkpoint: Optional[str] = None
    sam_model: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    sam_checkpoint: Optional[str] = None
    text_encoder: Literal["auto", "clip", "offline"] = "auto"
    points_per_side: int = 32
    short_side: int = 448
    label_noise: float = 0.0
    label_drop: float = 0.0
    label_merge: float = 0.0
    extract_batch: int = 1

    # codebook codec
    codebook_train: Literal["sparse", "dense"] = "sparse"
    """How the codebook's coefficients train (``--codec codebook``): ``sparse`` (default): each
    Gaussian starts from the views (the top-k entries nearest to the mean target of the pixels it
    covers) and its k (index, weight) pairs are rendered by the sparse pass, the weights trained
    on the k-sparse simplex (the indices stay); ``dense``: every level's L coefficients rendered
    as dense channels from uniform weights, projected onto the simplex after each step (k-sparse
    after half the steps). Ignored by other codecs, with ``joint`` and for dynamic scenes."""

    # several processes (torchrun)
    batch_size: Optional[int] = None
    """Training views per step over all ranks (each of N ranks renders batch_size / N); default
    1, or N under ``torchrun``; stored resolved (the run resumes on any divisor of it)."""

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(msg)

        if self.features not in ("labels", "sam-clip", "dense-clip"):
            bad(f"--features must be labels, sam-clip or dense-clip, got {self.features!r}")
        if self.steps < 1:
            bad(f"--lang-steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            bad(f"--lang-lr must be > 0, got {self.lr}")
        top = 256 if self.codec == "codebook" else 64
        if not 1 <= self.latent_dim <= top:
            what = "--codebook-size" if self.codec == "codebook" else "--latent-dim"
            bad(f"{what} must be in 1..{top}, got {self.latent_dim}")
        if self.ae_steps < 1:
            bad(f"--ae-steps must be >= 1, got {self.ae_steps}")
        if self.ckpt_every < 1:
            bad(f"--ckpt-every must be >= 1, got {self.ckpt_every}")
        if self.rgb_weight < 0:
            bad(f"--rgb-weight must be >= 0, got {self.rgb_weight}")
        if self.batch_size is not None and self.batch_size < 1:
            bad(f"the language stage's batch_size must be >= 1, got {self.batch_size}")
        if self.codebook_train not in ("sparse", "dense"):
            bad(f"codebook_train must be sparse or dense, got {self.codebook_train!r}")
        for k in ("label_noise", "label_drop", "label_merge"):
            if getattr(self, k) < 0:
                bad(f"--{k.replace('_', '-')} must be >= 0")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LangConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown language options {unknown}")
        return cls(**dict(d))


LANG_RESUME_MAY_CHANGE = ("steps", "device", "ckpt_every", "keep_checkpoints", "progress", "extract_batch")


class LanguageError(ValueError):
    """A user error in the language stage (one-line message)."""


def _resolve_device(device: str) -> torch.device:
    return resolve_device(device, error=LanguageError)


# ------------------------------------------------------------------------------------------
# targets: encoded 2D features per training view

class _Targets:
    """Per training view and level, the codec's targets the renders are fitted to.

    Region caches keep the index maps (int16/int32, [levels, H, W]) and the encoded region
    latents ([R, L] per level); dense caches keep the encoded patch maps ([h, w, L]) and
    upsample them at the step. ``get(i)`` -> (target [H, W, levels*L], valid [H, W, levels])."""

    def __init__(self, cache, names: Dict[int, str], sizes: Dict[int, Tuple[int, int]], codec, levels: List[str],
                 device: torch.device, compact: bool = False):
        dev = next(codec.parameters()).device if hasattr(codec, "parameters") else device
        latent_dim = codec.latent_dim if compact else codec.target_dim

        def encoder(x: Tensor) -> Tensor:
            t = codec.targets(x.to(dev))
            return (codec.project_targets(t) if compact else t).cpu()

        self.levels = levels
        self.device = device
        self.kind = cache.kind
        self.items: Dict[int, Any] = {}
        with torch.no_grad():
            for i, name in names.items():
                fm = cache.load(name)
                H, W = sizes[i]
                if self.kind == "regions":
                    idxs, zs = [], []
                    for lv in levels:
                        m = fm.levels[lv]
                        idx = m.index
                        if tuple(idx.shape) != (H, W):
                            idx = F.interpolate(idx[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0]
                        idx = idx.long()
                        R = m.features.shape[0]
                        z = encoder(m.features.float()) if R else torch.zeros(0, latent_dim)
                        idxs.append(idx.to(torch.int16 if R < 32767 else torch.int32))
                        zs.append(z.float().cpu())
                    self.items[i] = (torch.stack(idxs), zs)
                else:
                    zmaps = [encoder(fm.levels[lv].features.float()).float().cpu() for lv in levels]
                    self.items[i] = (zmaps, (H, W))

    def get(self, i: int) -> Tuple[Tensor, Tensor]:
        if self.kind == "regions":
            idx, zs = self.items[i]
            outs, valids = [], []
            for li, z in enumerate(zs):
                ix = idx[li].to(self.device).long()
                table = torch.cat([z, z.new_zeros(1, z.shape[1])]).to(self.device)
                outs.append(table[torch.where(ix < 0, table.shape[0] - 1, ix)])
                valids.append(ix >= 0)
            return torch.cat(outs, -1), torch.stack(valids, -1)
        zmaps, (H, W) = self.items[i]
        outs = []
        for z in zmaps:
            x = z.to(self.device).permute(2, 0, 1)[None]
            outs.append(F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0))
        t = torch.cat(outs, -1)
        return t, torch.ones(*t.shape[:2], len(zmaps), dtype=torch.bool, device=self.device)


def _compact_loss(codec) -> bool:
    """Codecs whose loss runs on targets projected onto their latent space (the codebook's
    ``C t``, :meth:`~langfield.codec.codebook.CodebookCodec.loss_projected`): targets of
    ``latent_dim`` numbers per pixel instead of ``in_dim``."""
    return hasattr(codec, "project_targets") and hasattr(codec, "loss_projected")


def masked_l1(pred: Tensor, target: Tensor, valid: Tensor, n_levels: int) -> Tensor:
    """Mean absolute error over the valid pixels of each level, summed over levels
    (``pred``/``target`` [H, W, levels*L], ``valid`` [H, W, levels])."""
    L = pred.shape[-1] // n_levels
    total = pred.new_zeros(())
    for li in range(n_levels):
        v = valid[..., li]
        n = v.sum()
        if int(n) == 0:
            continue
        d = (pred[..., li * L:(li + 1) * L] - target[..., li * L:(li + 1) * L]).abs().sum(-1)
        total = total + (d * v).sum() / (n * L)
    return total


# ------------------------------------------------------------------------------------------

class LanguageTrainer(EpochSampler):
    """Runs the language stage of one run folder (see the module docstring)."""

    def __init__(self, run: Path, cfg: LangConfig, *, log=print, extractor=None):
        self.rf = RunFolder(run)
        self.root = self.rf.root
        self.cfg = cfg
        self.log = log
        self.extractor = extractor
        try:
            self.doc = self.rf.read_config()
        except RunError as e:
            raise LanguageError(str(e)) from None
        self.device = _resolve_device(cfg.device)
        self.lang_dir = self.root / "language"
        self.ckpt_dir = self.lang_dir / "checkpoints"
        self.step = 0
        self.train_time = 0.0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm = torch.zeros(0, dtype=torch.long)
        self.pos = 0
        self.last_ckpt_step: Optional[int] = None
        self._support: Optional[Tensor] = None  # sparse codebook training: the (fixed) pair indices [N, levels*k]
        self._support32: Optional[Tensor] = None  # the same, int32 (the renderer's index type)
        self._compact = False  # targets projected onto the latent space (_compact_loss)
        from langfield import distributed

        self.job = distributed.get()
        self.batch = int(cfg.batch_size or 1)
        if self.batch % self.job.world:
            raise LanguageError(f"the language stage's batch ({self.batch} views per step) is not a multiple of the "
                                f"{self.job.world} ranks of this job; run it with a divisor of it")

    # ---- set-up ------------------------------------------------------------------------------
    def prepare(self, resume: bool, overwrite_features: bool = False) -> None:
        """Load the RGB run, extract features, fit the autoencoder, build targets and the
        parameters (from the newest language checkpoint when ``resume``)."""
        rgb_ck = self.rf.latest_checkpoint()
        if rgb_ck is None:
            raise LanguageError(f"{self.root}: no RGB checkpoint; the language stage starts from a trained RGB run")
        self._load_data()

        # 1. features
        self.cache = self._extract(overwrite_features)
        self._prepare_rest(resume)

    def _load_data(self) -> None:
        """The run's dataset, its training views and the render backend."""
        from langfield.train.config import TrainConfig

        cfg, doc = self.cfg, self.doc
        tcfg = TrainConfig.from_dict(doc["train"])
        data = Path(doc["data"])
        if not data.exists():
            raise LanguageError(f"the run's dataset {data} is missing (moved or deleted)")
        try:
            self.ds = open_dataset(data, downscale=tcfg.downscale, normalize=tcfg.normalize,
                                   test_every=tcfg.test_every, cache_images=True, verify=True,
                                   skip_bad=tcfg.skip_bad_images, allow_outside=tcfg.allow_outside)
        except RunError as e:
            raise LanguageError(str(e)) from None
        self.tcfg = tcfg
        self.train_idx = self.ds.indices("train")
        from langfield.render import resolve_backend

        self.backend = resolve_backend(cfg.backend, self.device, torch.float32, needs_features=cfg.joint)

    def _prepare_rest(self, resume: bool) -> None:
        cfg = self.cfg
        self.levels = list(self.cache.levels)
        # 2. codec
        self.codec = self.ae = self._codec()
        # 3. parameters
        ck = None
        if resume:
            _p, ck = self.rf.store("language").latest(quarantine=self.job.is_main)  # corrupt newest: moved aside
            if ck is not None and ck.step > cfg.steps:
                raise LanguageError(f"--lang-steps {cfg.steps} is below the language checkpoint's step {ck.step}")
        _bp, base = self.rf.store("rgb").latest(quarantine=self.job.is_main)
        if base is None:
            raise LanguageError(f"{self.root}: no readable RGB checkpoint in {self.rf.checkpoints}")
        self.rgb_step = int(base.step)
        self._init_params(base, ck)
        # 4. targets
        names = {i: self._frame_name(i) for i in self.train_idx}
        sizes = {i: (int(self.ds.frames[i].height), int(self.ds.frames[i].width)) for i in self.train_idx}
        missing = [n for n in names.values() if not self.cache.has(n)]
        if missing:
            raise LanguageError(f"{self.cache.folder}: features missing for {len(missing)} training images "
                                f"(e.g. {missing[0]!r}); rerun to extract them")
        t0 = time.perf_counter()
        # targets projected onto the codec's latent space when this class's step computes the loss
        # (a subclass with its own training step gets the codec's plain targets)
        self._compact = _compact_loss(self.codec) and type(self).train_step is LanguageTrainer.train_step
        self.targets = _Targets(self.cache, names, sizes, self.codec, self.levels, self.device, self._compact)
        self.log(f"[language] targets for {len(names)} views encoded in {time.perf_counter() - t0:.1f} s")
        self._cams = CameraCache(self.ds.frames, self.device)
        if self._sparse_codebook():
            self._start_sparse(ck)
        if self.job.is_main:
            self._write_config()

    # ---- the codebook's sparse training --------------------------------------------------------
    def _sparse_codebook(self) -> bool:
        """The codebook's sparse training applies: codec with view initialisation, option
        ``sparse``, geometry frozen, static Gaussians, this class's own training step."""
        from langfield.scene import Gaussians

        g = self.gaussians
        return (self.cfg.codebook_train == "sparse" and hasattr(self.codec, "init_weights") and not self.cfg.joint
                and isinstance(g, Gaussians) and type(g).activated is Gaussians.activated
                and type(self).train_step is LanguageTrainer.train_step)

    def _start_sparse(self, ck) -> None:
        """The pair indices of the sparse training: from the checkpoint when resuming, else the
        coefficients start from the views (:meth:`_view_init`) and their k non-zeros per level
        are the pairs."""
        from langfield.render.sparse import sparse_topk

        lang = self.gaussians.splats["lang"]
        sup = None if ck is None else ck.tensors.get("sparse", {}).get("support")
        if sup is None:
            if ck is None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    lang.data.copy_(self._view_init())
                self.log(f"[language] codebook: coefficients from the views in {time.perf_counter() - t0:.1f} s")
            sup = sparse_topk(lang.detach(), self.cfg.latent_dim, self.codec.topk)[0]
        self._support = sup.to(device=lang.device, dtype=torch.int64).contiguous()
        self._support32 = self._support.to(torch.int32)

    @torch.no_grad()
    def _view_init(self) -> Tensor:
        """Per Gaussian and level the blend-weighted mean of the projected targets of the training
        pixels it covers (one backward pass per view: the gradient of ``sum(render * target)``
        with respect to a per-Gaussian channel is that Gaussian's weighted sum), then
        :meth:`CodebookCodec.init_weights`."""
        g = self.gaussians
        nl, L = len(self.levels), self.cfg.latent_dim
        acc = torch.zeros(g.num, nl * L + nl, device=self.device)
        for i in self.train_idx:
            tc, valid = self.targets.get(i)
            v = valid.to(tc.dtype)
            wts = torch.cat([tc * v.repeat_interleave(L, -1), v], -1)
            E = torch.zeros(g.num, nl * L + nl, device=self.device, requires_grad=True)
            with torch.enable_grad():
                out = render(g, self._cams[i], colors=False, extra=E, backend=self.backend, validate=False)
                (out.extra[0] * wts).sum().backward()
            acc += E.grad
        cover = acc[:, nl * L:]
        mean = acc[:, :nl * L] / cover.clamp_min(1e-12).repeat_interleave(L, -1)
        return self.codec.init_weights(mean, cover > 1e-6)

    def _frame_name(self, i: int) -> str:
        f = self.ds.frames[i]
        return f.name or Path(f.image_path).name

    def _extract(self, overwrite: bool = False):
        from langfield.features import CacheMismatchError, extract_dataset, make_extractor
        from langfield.features.dense_clip import DenseClipParams
        from langfield.features.labels import LabelsParams
        from langfield.features.sam_clip import SamClipParams

        c = self.cfg
        ex = self.extractor
        if ex is None:
            ex = make_extractor(c.features, clip_model=c.clip_model, clip_pretrained=c.clip_pretrained,
                                clip_checkpoint=c.clip_checkpoint, sam_model=c.sam_model,
                                sam_checkpoint=c.sam_checkpoint, text_encoder=c.text_encoder, device=self.device,
                                sam_params=SamClipParams(points_per_side=c.points_per_side),
                                dense_params=DenseClipParams(short_side=c.short_side),
                                labels_params=LabelsParams(c.label_noise, c.label_drop, c.label_merge, c.seed),
                                log=lambda m: self.log(f"[language] {m}"))
        idx = self.train_idx if c.feature_split == "train" else list(range(len(self.ds)))
        try:
            return extract_dataset(self.ds, ex, self.root / "features", batch_size=c.extract_batch,
                                   progress=self._show(), indices=idx, overwrite=overwrite,
                                   log=lambda m: self.log(f"[language] {m}"))
        except CacheMismatchError as e:
            raise LanguageError(f"{e}; --overwrite re-extracts") from None

    def _show(self) -> Optional[bool]:
        """The progress option as the extraction, the codec fit and eval take it (None: a bar on a
        terminal, plain lines in a log)."""
        return self.cfg.progress

    def fingerprint(self) -> Dict[str, Any]:
        """What every rank must agree on before the first language step."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("progress", "device", "extract_batch")}
        return {"config": cfg, "data": self.doc.get("data"), "rgb_step": self.rgb_step, "step": self.step,
                "num_gaussians": self.gaussians.num, "levels": self.levels, "train_views": list(self.train_idx),
                "backend": self.backend, "codec": self.codec.report.get("fit_key")}

    def _ae_key(self) -> Dict[str, Any]:
        c = self.cfg
        return {"features": self.cache.extractor, "features_config": self.cache.config, "latent_dim": c.latent_dim,
                "steps": c.ae_steps, "batch": c.ae_batch, "lr": c.ae_lr, "max_vectors": c.ae_max_vectors,
                "seed": c.seed, "images": sorted(self._frame_name(i) for i in self.train_idx)}

    def _codec(self):
        """The run's language codec: reused when fitted on the same features with the same
        options (a fit key in its report), else fitted on every level's cached features."""
        import json

        c = self.cfg
        path = self.root / codec_file(c.codec)
        key = self._ae_key()
        js = path.with_suffix(".json")
        if path.is_file() and js.is_file():
            try:
                stored = json.loads(js.read_text("utf-8")).get("config", {}).get("report", {}).get("fit_key")
            except (json.JSONDecodeError, UnicodeDecodeError):
                stored = None
            if stored == json.loads(json.dumps(key)):
                codec = load_codec(path, c.codec, device=self.device)
                self.log(f"[language] {c.codec}: reusing {path} (held-out cosine "
                         f"{codec.report.get('heldout_cos', float('nan')):.4f})")
                return codec
            self.log(f"[language] {c.codec}: the features or options changed; fitting again")
        if not self.job.is_main:  # rank 0 fits and writes the codec; the others only read it
            raise LanguageError(f"rank {self.job.rank}: {path} is not the codec rank 0 fitted for these features and "
                                f"options (is the run folder shared by every node?)")

        def chunks():
            for i in self.train_idx:
                fm = self.cache.load(self._frame_name(i))
                for lv in self.cache.levels:
                    f = fm.levels[lv].features
                    yield f.reshape(-1, f.shape[-1])

        torch_threads = torch.get_num_threads()
        codec, rep = fit_codec(c.codec, chunks(), latent_dim=c.latent_dim, steps=c.ae_steps, batch_size=c.ae_batch,
                               lr=c.ae_lr, max_vectors=c.ae_max_vectors, seed=c.seed, device=self.device,
                               progress=self._show())
        torch.set_num_threads(torch_threads)
        codec.report["fit_key"] = key
        codec.save(path)
        self.log(f"[language] {c.codec}: {rep['n_train']} features, {rep['steps']} steps in {rep['seconds']:.1f} s; "
                 f"cosine train {rep['train_cos']:.4f}, held-out "
                 + (f"{rep['heldout_cos']:.4f}" if rep["heldout_cos"] is not None else "n/a") + f" -> {path}")
        return codec

    def _init_params(self, base, ck) -> None:
        from langfield.scene import Gaussians

        c = self.cfg
        src = ck.tensors["splats"] if ck is not None else base.tensors["splats"]
        g = Gaussians.from_dict(src, requires_grad=c.joint, copy=True).to(self.device)
        n_lang = len(self.levels) * c.latent_dim
        if g.lang is None or g.lang.shape[1] != n_lang or ck is None:
            g.set_lang(torch.zeros(g.num, n_lang, device=self.device), requires_grad=True)
            project = getattr(self.codec, "project_", None)  # codecs whose coefficients live on a simplex
            if project is not None:
                with torch.no_grad():
                    project(g.splats["lang"].data, 0.0)
        else:
            g.splats["lang"].requires_grad_(True)
        self.gaussians = g
        names = ["lang"] + (["means", "quats", "scales", "opacities", "sh0", "shN"] if c.joint else [])
        t = self.tcfg
        scene_scale = float(self.ds.scene_scale) * 1.1
        lrs = {"lang": c.lr, "means": t.means_lr * scene_scale * t.means_lr_final, "quats": t.quats_lr,
               "scales": t.scales_lr, "opacities": t.opacities_lr, "sh0": t.sh0_lr, "shN": t.shN_lr}
        self.optimizers = {k: torch.optim.Adam([{"params": g.splats[k], "lr": lrs[k], "name": k}], eps=1e-15,
                                               fused=True) for k in names if g.splats[k].numel()}
        if ck is not None:
            for k, st in ck.tensors.get("optim", {}).items():
                if k in self.optimizers:
                    self.optimizers[k].state[g.splats[k]] = {n: v.to(self.device) for n, v in st.items()}
            rng = ck.tensors.get("rng", {})
            if "sampler" in rng:
                self.gen.set_state(rng["sampler"])
            self.perm = ck.tensors.get("sampler", {}).get("perm", torch.zeros(0, dtype=torch.long)).long()
            self.pos = int(ck.config.get("sampler_pos", 0))
            self.step = int(ck.step)
            self.train_time = float(ck.config.get("train_time_s", 0.0))
            self.last_ckpt_step = self.step
            if int(ck.config.get("rgb_step", -1)) != self.rgb_step:
                self.log(f"[language] note: the language checkpoint started from RGB step "
                         f"{ck.config.get('rgb_step')}, the newest RGB checkpoint is {self.rgb_step}")
        from langfield.train.config import trained_sh_degree

        self.sh_degree = trained_sh_degree(self.tcfg.to_dict(), self.rgb_step, g.sh_degree)

    def _write_config(self) -> None:
        doc = self.rf.read_config()
        old = doc.get("language") or {}
        history = list(old.get("history", []))
        history.append({"time": datetime.now().isoformat(timespec="seconds"),
                        "event": "resumed" if self.step else "started", "step": self.step})
        doc["language"] = {
            "config": self.cfg.to_dict(), "levels": self.levels, "latent_dim": self.cfg.latent_dim,
            "features": self.cache.extractor, "feature_kind": self.cache.kind, "feature_config": self.cache.config,
            "text": self.cache.text_config, "rgb_step": self.rgb_step,
            "codec": {"kind": self.cfg.codec, "file": codec_file(self.cfg.codec)},
            "autoencoder": codec_file(self.cfg.codec),  # read by langfield < 0.2
            "autoencoder_report": {k: v for k, v in self.codec.report.items() if k != "fit_key"},
            "history": history,
        }
        atomic_write_json(self.rf.config, doc)
        self.doc = doc

    # ---- training ----------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        if self.batch > 1 or self.job.active:
            return self._train_step_batch()
        loss, lang_l = self._view_loss(self._next_index())
        if not math.isfinite(float(loss.detach())):
            raise LanguageError(f"language training stopped at step {self.step + 1}: the loss is not finite")
        loss.backward()
        self._apply_step()
        return {"loss": float(loss.detach()), "lang_l1": float(lang_l)}

    def _apply_step(self) -> None:
        """The optimisers' step on the accumulated gradients, then the codec's projection (e.g.
        the codebook's top-k simplex weights)."""
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        if self._support is not None:  # sparse codebook: the k weights of each level back onto the simplex
            from langfield.codec.codebook import project_topk_simplex

            lang = self.gaussians.splats["lang"].data
            k = self.codec.topk
            vals = lang.gather(1, self._support)
            vals = project_topk_simplex(vals.reshape(lang.shape[0], -1, k), k).reshape(vals.shape)
            lang.scatter_(1, self._support, vals)
            return
        project = getattr(self.codec, "project_", None)
        if project is not None:
            with torch.no_grad():
                project(self.gaussians.splats["lang"].data, self.step / self.cfg.steps)

    def _view_loss(self, i: int):
        """``(loss, language L1)`` of one training view (the terms of :meth:`train_step`)."""
        c = self.cfg
        target, valid = self.targets.get(i)
        nl = len(self.levels)
        cams = self._cams[i]
        if c.joint:
            bg = torch.zeros(3, device=self.device)
            out = render(self.gaussians, cams, sh_degree=self.sh_degree, language=True, background=bg,
                         backend=self.backend, validate=False)
            pred_rgb, pred = out.rgb[0], out.lang[0]
        elif self._support is not None:  # sparse codebook: the k (index, weight) pairs per level
            from langfield.render.sparse import render_sparse

            lang = self.gaussians.splats["lang"]
            w = lang.gather(1, self._support)
            pred = render_sparse(self.gaussians, cams, self._support32, w, lang.shape[1],
                                 backend=self.backend).lang[0]
        else:
            out = render(self.gaussians, cams, colors=False, language=True, backend=self.backend, validate=False)
            pred = out.lang[0]
        compact = self._compact
        L = self.cfg.latent_dim
        T = L if compact else self.codec.target_dim
        loss_fn = self.codec.loss_projected if compact else self.codec.loss
        loss = pred.new_zeros(())
        for li in range(nl):
            loss = loss + loss_fn(pred[..., li * L:(li + 1) * L], target[..., li * T:(li + 1) * T], valid[..., li])
        lang_l = loss.detach()
        if c.joint and c.rgb_weight > 0:
            from langfield.eval.views import composite_on
            from langfield.train.losses import rgb_loss

            image, alpha = self.ds._cached_rgba(i)
            gt = composite_on(image.to(self.device), None if alpha is None else alpha.to(self.device), bg)
            l_rgb, _, _ = rgb_loss(pred_rgb.clamp(0, 1), gt, self.tcfg.ssim_lambda)
            loss = loss + c.rgb_weight * l_rgb
        return loss, lang_l

    def _train_step_batch(self) -> Dict[str, float]:
        """``batch`` views per step, this rank's share rendered here, the gradients summed over
        the ranks (as the RGB stage, :mod:`langfield.distributed.dp`)."""
        from langfield import distributed

        job, B = self.job, self.batch
        job.set_step(self.step)
        views = [self._next_index() for _ in range(B)]
        stats = torch.zeros(2, dtype=torch.float64)
        for j in job.share(B):
            loss, lang_l = self._view_loss(views[j])
            (loss / B).backward()
            stats += torch.stack([loss.detach().double().cpu(), lang_l.double().cpu()])
        params = [p for p in self.gaussians.splats.values() if p.requires_grad]
        stats = distributed.all_reduce_grads(params, extra=stats, dist_=job)
        lv, lang_l = float(stats[0]) / B, float(stats[1]) / B
        if not math.isfinite(lv):
            raise LanguageError(f"language training stopped at step {self.step + 1}: the loss is not finite")
        self._apply_step()
        return {"loss": lv, "lang_l1": lang_l}

    def save_checkpoint(self) -> Path:
        g = self.gaussians
        if not all(bool(torch.isfinite(p).all()) for p in g.splats.values()):
            raise LanguageError("language training produced non-finite parameters; nothing was saved")
        if self.job.active:  # identical on every rank (checked); rank 0 writes
            self.job.check_params(g.splats, self.step)
            if not self.job.is_main:
                self.last_ckpt_step = self.step
                return self.rf.store("language").path(self.step)
        optim = {}
        for k, opt in self.optimizers.items():
            st = opt.state.get(g.splats[k], {})
            if st:
                optim[k] = {n: v for n, v in st.items() if isinstance(v, Tensor)}
        tensors = {"splats": {k: v.detach() for k, v in g.splats.items()}, "rng": {"sampler": self.gen.get_state()},
                   "sampler": {"perm": self.perm.clone()}}
        if optim:
            tensors["optim"] = optim
        if self._support is not None:
            tensors["sparse"] = {"support": self._support.to(torch.int32).cpu()}
        cfg = {"stage": "language", "rgb_step": self.rgb_step, "lang": self.cfg.to_dict(), "sampler_pos": self.pos,
               "train_time_s": self.train_time, "levels": self.levels, "latent_dim": self.cfg.latent_dim,
               "num_gaussians": g.num}
        p = self.rf.store("language", self.cfg.keep_checkpoints).save(tensors, cfg, self.step)
        self.last_ckpt_step = self.step
        return p

    def train(self) -> None:
        c = self.cfg
        if self.step >= c.steps:
            return
        mode = None if c.progress is None else ("bar" if c.progress else "off")
        bar = Progress(c.steps, self.step, desc="language", mode=mode if self.job.is_main else "off")
        ema = None
        try:
            t0 = time.perf_counter()
            while self.step < c.steps:
                out = self.train_step()
                ema = out["lang_l1"] if ema is None else 0.95 * ema + 0.05 * out["lang_l1"]
                if self.step % c.ckpt_every == 0 or self.step == c.steps:
                    self.train_time += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                if bar.active and self.step % 10 == 0:
                    bar.set(l1=ema, gaussians=self.gaussians.num)
                bar.update(1)
            self.train_time += time.perf_counter() - t0
        finally:
            bar.close()
        self.final_l1 = ema


def train_language(run: Union[str, Path], config: Optional[LangConfig] = None, *, resume: bool = False,
                   overwrite: bool = False, evaluate: bool = True, log=print, extractor=None,
                   **options) -> Dict[str, Any]:
    """Add (or continue, ``resume=True``) the language stage of an RGB run. Returns
    ``{"step", "train_time_s", "metrics": ...}`` (``metrics``: the query evaluation when the
    dataset has a ``queries.json``, else None). ``extractor``: an already built feature
    extractor (any :class:`~langfield.features.FeatureExtractor`, e.g. with models loaded by
    the caller) instead of building ``features`` by name.

    On a run that already has a language stage, options not given (not in ``options`` and no
    ``config``) keep their stored values: the stage continues (or reports itself finished);
    options that differ from the stored ones are refused unless ``overwrite``."""
    run = Path(run)
    rf = RunFolder(run)
    try:
        doc = rf.read_config()
    except RunError as e:
        raise LanguageError(str(e)) from None
    stored_doc = (doc.get("language") or {}).get("config")
    has_ckpt = bool(rf.store("language").steps())
    stored = None
    if stored_doc is not None:
        try:
            stored = LangConfig.from_dict(stored_doc)
        except (TypeError, ValueError) as e:
            raise LanguageError(f"{rf.config}: language section: {e}") from None
    if stored is not None and not overwrite:
        cfg = replace(stored if config is None else config, **options)
        diff = _lang_diff(stored, cfg) if has_ckpt else []
        if diff:
            raise LanguageError(f"{run} already has a language stage trained with other options "
                                f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in diff)}); leave them out to "
                                f"continue it, or pass --overwrite-language to train it again")
        resume = resume or has_ckpt  # the same stage again: continue it (or report it finished)
    else:
        cfg = replace(config or LangConfig(), **_codec_defaults(config, options))
        if has_ckpt and not overwrite:
            resume = True
    from langfield import distributed

    job = distributed.get()
    if cfg.batch_size is None:  # a new stage: one view per rank and step (stored resolved)
        cfg = replace(cfg, batch_size=job.world if (stored is None or overwrite) else 1)
    try:
        cfg.validate()
    except ValueError as e:
        raise LanguageError(str(e)) from None
    try:
        if job.active and not job.is_main:
            # a torchrun job: every rank extracts its share of the images into the one cache,
            # waits for rank 0 to fit the codec, then trains its share of each batch
            tr = LanguageTrainer(run, cfg, log=lambda m: log(f"[rank {job.rank}/{job.world}] {m}"),
                                 extractor=extractor)
            tr._load_data()
            tr.cache = tr._extract(overwrite)
            job.wait_all("rank 0 fitting the language codec")
            tr._prepare_rest(resume)
            job.check_same("language stage", tr.fingerprint())
            tr.train()
            if tr.last_ckpt_step != tr.step:
                tr.save_checkpoint()
            job.barrier("end of the language stage")
            return {"step": tr.step, "train_time_s": tr.train_time, "metrics": None}
        with rf.lock():
            return _train_language_locked(run, rf, cfg, resume, overwrite, evaluate, log, extractor)
    except RunError as e:
        job.report(f"LanguageError: {e}")
        raise LanguageError(str(e)) from None
    except BaseException as e:
        job.report(f"{type(e).__name__}: {distributed.core.fail_line(e)}")
        raise


CODEBOOK_SIZE = 64
"""Codebook entries of a new codebook stage when not given (the issue's and LangSplatV2's L)."""
CODEBOOK_LR = 0.01
"""Learning rate of the codebook's weights when not given (they live on a k-sparse simplex: a
larger step than the autoencoder latents' 0.0025; tabletop 96x96, 1000 steps: loc 0.98)."""


def _codec_defaults(config: Optional[LangConfig], options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` plus the codebook's own defaults (:data:`CODEBOOK_SIZE`, :data:`CODEBOOK_LR`)
    for what a new codebook stage leaves unset (no ``config`` and not in ``options``): the
    dataclass defaults are the autoencoder's (3 latents, lr 0.0025). Stored resolved."""
    codec = options.get("codec", config.codec if config is not None else LangConfig.codec)
    if codec != "codebook" or config is not None:
        return dict(options)
    out = dict(options)
    out.setdefault("latent_dim", CODEBOOK_SIZE)
    out.setdefault("lr", CODEBOOK_LR)
    return out


def _train_language_locked(run: Path, rf: RunFolder, cfg: LangConfig, resume: bool, overwrite: bool, evaluate: bool,
                           log, extractor) -> Dict[str, Any]:
    lang_dir = run / "language"
    if overwrite and lang_dir.exists():
        dest = rf.move_aside(("language", "autoencoder.safetensors", "autoencoder.json", "codebook.safetensors",
                              "codebook.json"), prefix="replaced-language")
        log(f"[language] moved the previous language stage to {dest}")
    tr = LanguageTrainer(run, cfg, log=log, extractor=extractor)
    from langfield.features.cache import CacheCorruptError

    try:
        tr.prepare(resume=resume, overwrite_features=overwrite)
    except CacheCorruptError as e:
        raise LanguageError(f"{e}; run the same command again to recompute it") from None
    job = tr.job
    if job.active:  # the codec is written: the other ranks read it and join
        job.wait_all("rank 0 fitting the language codec")
        job.check_same("language stage", tr.fingerprint())
    already = tr.step >= cfg.steps
    tr.train()
    if tr.last_ckpt_step != tr.step:
        tr.save_checkpoint()
    if job.active:
        job.barrier("end of the language stage")
    if not already:
        log(f"[language] {tr.step} steps in {tr.train_time:.1f} s ({tr.train_time / max(tr.step, 1) * 1000:.1f} "
            f"ms/step); {tr.gaussians.num} Gaussians x {len(tr.levels)} levels x {cfg.latent_dim} latents "
            f"-> {tr.ckpt_dir}")
    result: Dict[str, Any] = {"step": tr.step, "train_time_s": tr.train_time, "metrics": None}
    if evaluate:
        qpath = find_queries(Path(tr.doc["data"]))
        if qpath is not None:
            from langfield.eval.language import evaluate_run

            result["metrics"] = evaluate_run(run, qpath, device=cfg.device, log=log, progress=tr._show())
    return result


def stored_language_config(run: Path) -> Optional[LangConfig]:
    """The language options stored in a run's config.json, or None (no run, no stage yet)."""
    try:
        doc = RunFolder(run).read_config()
    except RunError:
        return None
    d = (doc.get("language") or {}).get("config")
    if d is None:
        return None
    try:
        return LangConfig.from_dict(d)
    except (TypeError, ValueError):
        return None


def _lang_diff(a: LangConfig, b: LangConfig) -> List[Tuple[str, Any, Any]]:
    da, db = a.to_dict(), b.to_dict()
    return [(k, da[k], db.get(k)) for k in da if k not in LANG_RESUME_MAY_CHANGE and da[k] != db.get(k)]


def find_queries(data: Path) -> Optional[Path]:
    """``queries.json`` of a dataset folder (or next to its transforms file), if any."""
    data = Path(data)
    p = (data if data.is_dir() else data.parent) / "queries.json"
    return p if p.is_file() else None
