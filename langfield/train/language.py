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
   (masked L1; LangSplat's loss without its three separate trainings). Geometry and colour
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
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from langfield.io.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from langfield.train.rgb import EpochSampler

__all__ = ["LangConfig", "LanguageTrainer", "train_language", "LANG_RESUME_MAY_CHANGE"]

FeatureKind = Literal["labels", "sam-clip", "dense-clip"]


@dataclass
class LangConfig:
    """Options of the language stage (stored in ``RUN/config.json`` under ``language.config``)."""

    features: FeatureKind = "labels"
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

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(msg)

        if self.features not in ("labels", "sam-clip", "dense-clip"):
            bad(f"--features must be labels, sam-clip or dense-clip, got {self.features!r}")
        if self.steps < 1:
            bad(f"--lang-steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            bad(f"--lang-lr must be > 0, got {self.lr}")
        if not 1 <= self.latent_dim <= 64:
            bad(f"--latent-dim must be in 1..64, got {self.latent_dim}")
        if self.ae_steps < 1:
            bad(f"--ae-steps must be >= 1, got {self.ae_steps}")
        if self.ckpt_every < 1:
            bad(f"--ckpt-every must be >= 1, got {self.ckpt_every}")
        if self.rgb_weight < 0:
            bad(f"--rgb-weight must be >= 0, got {self.rgb_weight}")
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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LanguageError("--device cuda: no CUDA device is available")
    return torch.device(device)


# ------------------------------------------------------------------------------------------
# targets: encoded 2D features per training view

class _Targets:
    """Per training view and level, the encoded latents the renders are fitted to.

    Region caches keep the index maps (int16/int32, [levels, H, W]) and the encoded region
    latents ([R, L] per level); dense caches keep the encoded patch maps ([h, w, L]) and
    upsample them at the step. ``get(i)`` -> (target [H, W, levels*L], valid [H, W, levels])."""

    def __init__(self, cache, names: Dict[int, str], sizes: Dict[int, Tuple[int, int]], ae, levels: List[str],
                 device: torch.device):
        dev = next(ae.parameters()).device
        latent_dim = ae.latent_dim

        def encoder(x: Tensor) -> Tensor:
            return ae.encode(x.to(dev)).cpu()

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
        from langfield.train.rgb import RunError, RunFolder

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

    # ---- set-up ------------------------------------------------------------------------------
    def prepare(self, resume: bool, overwrite_features: bool = False) -> None:
        """Load the RGB run, extract features, fit the autoencoder, build targets and the
        parameters (from the newest language checkpoint when ``resume``)."""
        from langfield.train.rgb import RunError, _load_dataset
        from langfield.train.config import TrainConfig

        cfg = self.cfg
        doc = self.doc
        rgb_ck = self.rf.latest_checkpoint()
        if rgb_ck is None:
            raise LanguageError(f"{self.root}: no RGB checkpoint; the language stage starts from a trained RGB run")
        tcfg = TrainConfig.from_dict(doc["train"])
        data = Path(doc["data"])
        if not data.exists():
            raise LanguageError(f"the run's dataset {data} is missing (moved or deleted)")
        try:
            self.ds = _load_dataset(data, replace(tcfg, cache_images=True))
        except RunError as e:
            raise LanguageError(str(e)) from None
        self.tcfg = tcfg
        self.train_idx = self.ds.indices("train")
        from langfield.render import resolve_backend

        self.backend = resolve_backend(cfg.backend, self.device, torch.float32)

        # 1. features
        self.cache = self._extract(overwrite_features)
        self.levels = list(self.cache.levels)
        # 2. autoencoder
        self.ae = self._autoencoder()
        # 3. parameters
        ck = None
        if resume:
            from langfield.io.checkpoint import latest_checkpoint

            p = latest_checkpoint(self.ckpt_dir)
            ck = load_checkpoint(p) if p is not None else None
            if ck is not None and ck.step > cfg.steps:
                raise LanguageError(f"--lang-steps {cfg.steps} is below the language checkpoint's step {ck.step}")
        base = load_checkpoint(rgb_ck)
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
        self.targets = _Targets(self.cache, names, sizes, self.ae, self.levels, self.device)
        self.log(f"[language] targets for {len(names)} views encoded in {time.perf_counter() - t0:.1f} s")
        self._cams = {i: (torch.from_numpy(self.ds.frames[i].viewmat).float().to(self.device),
                          torch.from_numpy(self.ds.frames[i].K).float().to(self.device)) for i in self.train_idx}
        self._write_config()

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

    def _show(self) -> bool:
        return self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()

    def _ae_key(self) -> Dict[str, Any]:
        c = self.cfg
        return {"features": self.cache.extractor, "features_config": self.cache.config, "latent_dim": c.latent_dim,
                "steps": c.ae_steps, "batch": c.ae_batch, "lr": c.ae_lr, "max_vectors": c.ae_max_vectors,
                "seed": c.seed, "images": sorted(self._frame_name(i) for i in self.train_idx)}

    def _autoencoder(self):
        import json

        from langfield.autoencoder import SceneAutoencoder, fit_autoencoder

        path = self.root / "autoencoder.safetensors"
        key = self._ae_key()
        js = self.root / "autoencoder.json"
        if path.is_file() and js.is_file():
            try:
                stored = json.loads(js.read_text("utf-8")).get("config", {}).get("report", {}).get("fit_key")
            except (json.JSONDecodeError, UnicodeDecodeError):
                stored = None
            if stored == json.loads(json.dumps(key)):
                ae = SceneAutoencoder.load(path, device=self.device)
                self.log(f"[language] autoencoder: reusing {path} (held-out cosine "
                         f"{ae.report.get('heldout_cos', float('nan')):.4f})")
                return ae
            self.log("[language] autoencoder: the features or options changed; fitting again")

        def chunks():
            for i in self.train_idx:
                fm = self.cache.load(self._frame_name(i))
                for lv in self.cache.levels:
                    f = fm.levels[lv].features
                    yield f.reshape(-1, f.shape[-1])

        c = self.cfg
        torch_threads = torch.get_num_threads()
        ae, rep = fit_autoencoder(chunks(), latent_dim=c.latent_dim, steps=c.ae_steps, batch_size=c.ae_batch,
                                  lr=c.ae_lr, max_vectors=c.ae_max_vectors, seed=c.seed, device=self.device,
                                  progress=self._show())
        torch.set_num_threads(torch_threads)
        ae.report["fit_key"] = key
        ae.save(path)
        self.log(f"[language] autoencoder: {rep['n_train']} features, {rep['steps']} steps in {rep['seconds']:.1f} s; "
                 f"cosine train {rep['train_cos']:.4f}, held-out "
                 + (f"{rep['heldout_cos']:.4f}" if rep["heldout_cos"] is not None else "n/a") + f" -> {path}")
        return ae

    def _init_params(self, base, ck) -> None:
        from langfield.scene import Gaussians

        c = self.cfg
        src = ck.tensors["splats"] if ck is not None else base.tensors["splats"]
        g = Gaussians.from_dict(src, requires_grad=c.joint, copy=True).to(self.device)
        n_lang = len(self.levels) * c.latent_dim
        if g.lang is None or g.lang.shape[1] != n_lang or ck is None:
            g.set_lang(torch.zeros(g.num, n_lang, device=self.device), requires_grad=True)
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
            "text": self.cache.text_config, "rgb_step": self.rgb_step, "autoencoder": "autoencoder.safetensors",
            "autoencoder_report": {k: v for k, v in self.ae.report.items() if k != "fit_key"},
            "history": history,
        }
        atomic_write_json(self.rf.config, doc)
        self.doc = doc

    # ---- training ----------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        from langfield.render import rasterization

        c = self.cfg
        sp = self.gaussians.splats
        i = self._next_index()
        viewmat, K = self._cams[i]
        f = self.ds.frames[i]
        target, valid = self.targets.get(i)
        nl = len(self.levels)
        quats = sp["quats"]
        scales = torch.exp(sp["scales"])
        opac = torch.sigmoid(sp["opacities"])
        if c.joint:
            colors = torch.cat([sp["sh0"], sp["shN"]], 1)
            bg = torch.zeros(1, 3, device=self.device)
            out, _, _ = rasterization(sp["means"], quats, scales, opac, colors, viewmat[None], K[None], f.width,
                                      f.height, sh_degree=self.sh_degree, backgrounds=bg, features=sp["lang"],
                                      backend=self.backend)
            pred_rgb, pred = out[0, ..., :3], out[0, ..., 3:]
        else:
            out, _, _ = rasterization(sp["means"], quats, scales, opac, sp["lang"], viewmat[None], K[None], f.width,
                                      f.height, backend=self.backend)
            pred = out[0]
        loss = masked_l1(pred, target, valid, nl)
        lang_l = float(loss.detach())
        if c.joint and c.rgb_weight > 0:
            from langfield.train.losses import rgb_loss

            image, alpha = self.ds._cached_rgba(i)
            gt = image.to(self.device)
            if alpha is not None:
                gt = gt * alpha.to(self.device)  # RGBA data: composite on the black render background
            l_rgb, _, _ = rgb_loss(pred_rgb.clamp(0, 1), gt, self.tcfg.ssim_lambda)
            loss = loss + c.rgb_weight * l_rgb
        if not math.isfinite(float(loss.detach())):
            raise LanguageError(f"language training stopped at step {self.step + 1}: the loss is not finite")
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": float(loss.detach()), "lang_l1": lang_l}

    def save_checkpoint(self) -> Path:
        g = self.gaussians
        if not all(bool(torch.isfinite(p).all()) for p in g.splats.values()):
            raise LanguageError("language training produced non-finite parameters; nothing was saved")
        optim = {}
        for k, opt in self.optimizers.items():
            st = opt.state.get(g.splats[k], {})
            if st:
                optim[k] = {n: v for n, v in st.items() if isinstance(v, Tensor)}
        tensors = {"splats": {k: v.detach() for k, v in g.splats.items()}, "rng": {"sampler": self.gen.get_state()},
                   "sampler": {"perm": self.perm.clone()}}
        if optim:
            tensors["optim"] = optim
        cfg = {"stage": "language", "rgb_step": self.rgb_step, "lang": self.cfg.to_dict(), "sampler_pos": self.pos,
               "train_time_s": self.train_time, "levels": self.levels, "latent_dim": self.cfg.latent_dim,
               "num_gaussians": g.num}
        p = save_checkpoint(self.ckpt_dir, tensors, cfg, self.step)
        self.last_ckpt_step = self.step
        keep = self.cfg.keep_checkpoints
        if keep > 0:
            steps = sorted(int(q.stem[5:]) for q in self.ckpt_dir.glob("ckpt_*.json") if q.stem[5:].isdigit())
            for s in steps[:-keep]:
                for ext in (".json", ".safetensors"):
                    (self.ckpt_dir / f"ckpt_{s:07d}{ext}").unlink(missing_ok=True)
        return Path(p)

    def train(self) -> None:
        c = self.cfg
        if self.step >= c.steps:
            return
        from tqdm import tqdm

        show = self._show()
        bar = tqdm(total=c.steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True,
                   desc="language", smoothing=0.05)
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
                bar.update(1)
                if show and self.step % 10 == 0:
                    bar.set_postfix(l1=f"{ema:.4f}", refresh=False)
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
    the caller) instead of building ``features`` by name."""
    run = Path(run)
    cfg = replace(config or LangConfig(), **options)
    try:
        cfg.validate()
    except ValueError as e:
        raise LanguageError(str(e)) from None
    from langfield.train.rgb import RunError, RunFolder

    rf = RunFolder(run)
    try:
        doc = rf.read_config()
    except RunError as e:
        raise LanguageError(str(e)) from None
    lang_dir = run / "language"
    has_ckpt = (lang_dir / "checkpoints").is_dir() and any((lang_dir / "checkpoints").glob("ckpt_*.json"))
    stored = (doc.get("language") or {}).get("config")
    if has_ckpt and not resume and not overwrite:
        if stored is not None:
            diff = _lang_diff(LangConfig.from_dict(stored), cfg)
            if not diff:
                resume = True  # the same stage again: continue it (or report it finished)
            else:
                raise LanguageError(f"{run} already has a language stage trained with other options "
                                    f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in diff)}); pass --resume to "
                                    f"keep the stored options or --overwrite to train it again")
        else:
            resume = True
    if resume and stored is not None:
        diff = _lang_diff(LangConfig.from_dict(stored), cfg)
        if diff:
            raise LanguageError(f"--resume: language options differ from the stored ones: "
                                f"{', '.join(f'{k} (run: {a!r}, requested: {b!r})' for k, a, b in diff)}")
    if overwrite and lang_dir.exists():
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = run / f"replaced-language-{stamp}"
        dest.mkdir(parents=True)
        import os

        for name in ("language", "autoencoder.safetensors", "autoencoder.json"):
            if (run / name).exists():
                os.replace(run / name, dest / name)
        log(f"[language] moved the previous language stage to {dest}")
    tr = LanguageTrainer(run, cfg, log=log, extractor=extractor)
    tr.prepare(resume=resume, overwrite_features=overwrite)
    already = tr.step >= cfg.steps
    tr.train()
    if tr.last_ckpt_step != tr.step:
        tr.save_checkpoint()
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


def _lang_diff(a: LangConfig, b: LangConfig) -> List[Tuple[str, Any, Any]]:
    da, db = a.to_dict(), b.to_dict()
    return [(k, da[k], db.get(k)) for k in da if k not in LANG_RESUME_MAY_CHANGE and da[k] != db.get(k)]


def find_queries(data: Path) -> Optional[Path]:
    """``queries.json`` of a dataset folder (or next to its transforms file), if any."""
    data = Path(data)
    p = (data if data.is_dir() else data.parent) / "queries.json"
    return p if p.is_file() else None
