"""Language over time on a dynamic run (4D LangSplat's two fields on deformable Gaussians).

* **Time-agnostic field**: per-Gaussian latents of every level, trained as
  :mod:`langfield.train.language` does (features -> codec targets -> masked per-level loss),
  but rendered with the *deformed* geometry at each training frame's time. "the box" is found
  at any time.
* **Time-sensitive field** (``states=K > 0``): K state prototypes per Gaussian (latents of
  the run's codec) mixed by a small network of the deformation feature at ``t`` (plus an
  encoding of ``t``): ``softmax(mixer(feature(x, t), t)) @ prototypes``. Rendered as one more
  level, ``state``, next to the time-agnostic ones (one rasterizer pass); "open box" holds only
  at the frames where the box is open. Prototypes start at the K-means centres of the state
  targets (clustering), with a little seeded noise.

State supervision: per training frame a label map of *state texts*: for langfield's dynamic
scenes (``scene.json`` names a built-in scene) each state active at the frame's time
(``Scene.state_queries(t)``: "red light" on the red lamp before t = 0.5, "open box" on the box
from 0.35 to 0.8, ...) over its pixels, every other object pixel its whole-level name
(time-agnostic context), background none. The codec is fitted on the feature cache plus these
texts' embeddings, so the state texts decode.

Evaluation (:func:`evaluate_dynamic_run`): PSNR / SSIM on the held-out (view, time) pairs;
time-agnostic mIoU / localisation per frame (:func:`langfield.eval.language.evaluate_field` on
the queries that are not time-sensitive, each view rendered at its time); time-sensitive frame
accuracy and vIoU as 4D LangSplat defines them: for each time-sensitive query and each
held-out frame, the query *holds* in the prediction when the state level's best smoothed
relevancy reaches ``hold_threshold``; Acc = the fraction of (query, frame) pairs where
prediction and truth agree; vIoU of a query = sum of the mask IoUs over the frames in
prediction ∪ truth divided by their count (IoU 0 where only one side holds); reported means
over queries.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from langfield.codec import codec_file, fit_codec, load_codec
from langfield.dynamic.model import DeformableGaussians, StateMixer
from langfield.io.checkpoint import atomic_write_json
from langfield.render.model import render
from langfield.run import RunError, RunFolder, update_metrics
from langfield.train.language import LangConfig, LanguageError, LanguageTrainer

__all__ = ["DynamicLanguageTrainer", "train_dynamic_language", "state_label_maps", "evaluate_dynamic_run",
           "time_sensitive_metrics", "STATE_LEVEL"]

STATE_LEVEL = "state"


# ------------------------------------------------------------------------------------------
# state labels

def _scene_of(data: Path):
    p = data / "scene.json"
    if not p.is_file():
        raise LanguageError(f"{p}: not found; time-sensitive language needs per-frame state labels, which "
                            f"langfield's dynamic scenes give (`langfield scenes make dynamic`)")
    try:
        doc = json.loads(p.read_text("utf-8"))
        name, seed = str(doc["scene"]), int(doc.get("seed", 0))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise LanguageError(f"{p}: field 'scene' (and 'seed'): {e}") from None
    from langfield.scenes.builtin import SCENES

    if name not in SCENES:
        raise LanguageError(f"{p}: field 'scene': {name!r} is not a built-in scene; its state labels are unknown")
    return SCENES[name](seed)


def _read_label(path: Path, size: Tuple[int, int]) -> np.ndarray:
    from langfield.data.base import read_image

    a = read_image(path, "label map")
    if a.ndim == 3:
        a = a[..., 0]
    a = a.astype(np.int64)
    if a.shape != tuple(size):
        ys = (np.arange(size[0]) * a.shape[0] // size[0]).clip(0, a.shape[0] - 1)
        xs = (np.arange(size[1]) * a.shape[1] // size[1]).clip(0, a.shape[1] - 1)
        a = a[ys][:, xs]
    return a


def state_label_maps(ds, indices: Sequence[int]) -> Tuple[List[str], Dict[int, Tensor]]:
    """``(texts, maps)``: the state texts plus whole-object names, and per frame ``i`` an index
    map [H, W] into ``texts`` (-1 = background) at the frame's time (see the module docstring)."""
    root = Path(ds.root)
    scene = _scene_of(root)
    from langfield.features.labels import read_label_names

    try:
        names = read_label_names(root)
    except (FileNotFoundError, ValueError) as e:
        raise LanguageError(str(e)) from None
    state_texts = list(dict.fromkeys(s.name for o in scene.objects for s in (o.states or [])))
    whole = names["whole"]
    texts = state_texts + [whole[k] for k in sorted(whole)]
    whole_text = {k: len(state_texts) + j for j, k in enumerate(sorted(whole))}
    levels = ("whole", "part", "subpart")
    maps: Dict[int, Tensor] = {}
    for i in indices:
        f = ds.frames[i]
        lp = (getattr(f, "extras", None) or {}).get("label_paths")
        if not isinstance(lp, dict) or "whole" not in lp:
            raise LanguageError(f"{root}: frame {f.name}: field 'label_paths' missing (needed for state labels)")
        if f.time is None:
            raise LanguageError(f"{root}: frame {f.name}: field 'time' missing")
        H, W = int(f.height), int(f.width)
        lab = {lv: _read_label(root / lp[lv], (H, W)) for lv in levels if lv in lp}
        w = lab["whole"]
        out = np.full((H, W), -1, dtype=np.int64)
        for k, ti in whole_text.items():
            out[w == k] = ti
        for text, per_level in scene.state_queries(float(f.time)).items():
            for lv, ids in per_level.items():
                if ids and lv in lab:
                    out[np.isin(lab[lv], ids)] = state_texts.index(text)
        maps[i] = torch.from_numpy(out)
    return texts, maps


def _kmeans(x: Tensor, w: Tensor, k: int, iters: int = 30, seed: int = 0) -> Tensor:
    """Weighted K-means centres [k, D] of the rows of ``x`` (k-means++ seeding, seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n <= k:
        extra = x[torch.randint(0, n, (k - n,), generator=g)] + 0.01 * torch.randn(k - n, x.shape[1], generator=g)
        return torch.cat([x, extra])
    p = w / w.sum()
    c = [x[int(torch.multinomial(p, 1, generator=g))]]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(c)).min(1).values ** 2 * w
        c.append(x[int(torch.multinomial(d / d.sum() if d.sum() > 0 else p, 1, generator=g))])
    C = torch.stack(c)
    for _ in range(iters):
        a = torch.cdist(x, C).argmin(1)
        for j in range(k):
            m = a == j
            if m.any():
                C[j] = (x[m] * w[m, None]).sum(0) / w[m].sum()
    return C


# ------------------------------------------------------------------------------------------

class DynamicLanguageTrainer(LanguageTrainer):
    """The language stage on a dynamic run (see the module docstring). ``states``: K state
    prototypes per Gaussian (0 = time-agnostic field only)."""

    def __init__(self, run: Path, cfg: LangConfig, *, states: int = 2, mixer_hidden: int = 32,
                 state_weight: float = 1.0, log=print, extractor=None):
        super().__init__(run, cfg, log=log, extractor=extractor)
        if (self.doc.get("model") or {}).get("kind") != "deformable":
            raise LanguageError(f"{self.rf.config}: not a dynamic run (no deformable model); use the language stage "
                                f"of `langfield train`")
        if states < 0 or states == 1:
            raise LanguageError(f"--states must be 0 (off) or >= 2, got {states}")
        self.n_states = int(states)
        self.mixer_hidden = int(mixer_hidden)
        self.state_weight = float(state_weight)
        self.state_texts: List[str] = []
        self.state_maps: Dict[int, Tensor] = {}

    # ---- set-up --------------------------------------------------------------------------------
    def _extract(self, overwrite: bool = False):
        cache = super()._extract(overwrite)
        if self.n_states:
            self.state_texts, self.state_maps = state_label_maps(self.ds, self.train_idx)
            te = self._text_encoder(cache)
            with torch.no_grad():
                self.state_emb = te.encode(self.state_texts).float().cpu()
        return cache

    def _text_encoder(self, cache):
        from langfield.features.text import load_text_encoder

        ex = self.extractor
        te = getattr(ex, "text", None) if ex is not None else None
        return te if te is not None else load_text_encoder(cache.text_config, device="cpu")

    def _ae_key(self) -> Dict[str, Any]:
        key = super()._ae_key()
        if self.n_states:
            key["state_texts"] = list(self.state_texts)
        return key

    def _codec(self):
        """As the language stage's, with the state texts' embeddings among the fitted vectors."""
        c = self.cfg
        path = self.root / codec_file(c.codec)
        key = json.loads(json.dumps(self._ae_key()))
        js = path.with_suffix(".json")
        if path.is_file() and js.is_file():
            try:
                stored = json.loads(js.read_text("utf-8")).get("config", {}).get("report", {}).get("fit_key")
            except (json.JSONDecodeError, UnicodeDecodeError):
                stored = None
            if stored == key:
                self.log(f"[language] {c.codec}: reusing {path}")
                return load_codec(path, c.codec, device=self.device)

        def chunks():
            for i in self.train_idx:
                fm = self.cache.load(self._frame_name(i))
                for lv in self.cache.levels:
                    f = fm.levels[lv].features
                    yield f.reshape(-1, f.shape[-1])
            if self.n_states:  # each state text as often as a region appears in a few views
                yield self.state_emb.repeat(max(8, len(self.train_idx) // 2), 1)

        threads = torch.get_num_threads()
        codec, rep = fit_codec(c.codec, chunks(), latent_dim=c.latent_dim, steps=c.ae_steps, batch_size=c.ae_batch,
                               lr=c.ae_lr, max_vectors=c.ae_max_vectors, seed=c.seed, device=self.device,
                               progress=self._show())
        torch.set_num_threads(threads)
        codec.report["fit_key"] = key
        codec.save(path)
        self.log(f"[language] {c.codec}: {rep['n_train']} features (with {len(self.state_texts)} state texts), "
                 f"{rep['steps']} steps in {rep['seconds']:.1f} s -> {path}")
        return codec

    def _init_params(self, base, ck) -> None:
        from langfield.train.config import trained_sh_degree

        c = self.cfg
        src = ck if ck is not None else base
        g = DeformableGaussians.from_checkpoint(self.doc, src, self.device, requires_grad=False)
        g.deform_enabled = True
        nl = len(self.levels)
        n_lang = nl * c.latent_dim
        if "lang" not in g.splats or g.splats["lang"].shape[1] != n_lang or ck is None:
            g.set_lang(torch.zeros(g.num, n_lang, device=self.device), requires_grad=True)
        else:
            g.splats["lang"].requires_grad_(True)
        fresh_states = False
        if self.n_states:
            if g.states is None or ck is None or g.states.shape[1] != self.n_states:
                torch.manual_seed(c.seed)
                mixer = StateMixer(g.deform.cfg.hidden, self.n_states, self.mixer_hidden)
                g.set_states(torch.zeros(g.num, self.n_states, c.latent_dim), mixer)
                fresh_states = True
            g.states.requires_grad_(True)
            for p in g.mixer.parameters():
                p.requires_grad_(True)
        else:
            g.set_states(None)
        self.gaussians = g
        self._fresh_states = fresh_states
        self.optimizers = {"lang": torch.optim.Adam([{"params": [g.splats["lang"]], "lr": c.lr, "name": "lang"}],
                                                    eps=1e-15)}
        if self.n_states:
            self.optimizers["states"] = torch.optim.Adam([{"params": [g.states], "lr": c.lr, "name": "states"}],
                                                         eps=1e-15)
            self.optimizers["mixer"] = torch.optim.Adam([{"params": list(g.mixer.parameters()), "lr": 1e-3,
                                                          "name": "mixer"}], eps=1e-15)
        if ck is not None:
            for k, st in ck.tensors.get("optim", {}).items():
                if k in self.optimizers:
                    sd = self.optimizers[k].state_dict()
                    sd["state"] = {int(j): {n: v.to(self.device) for n, v in s.items()} for j, s in st.items()}
                    self.optimizers[k].load_state_dict(sd)
            rng = ck.tensors.get("rng", {})
            if "sampler" in rng:
                self.gen.set_state(rng["sampler"])
            self.perm = ck.tensors.get("sampler", {}).get("perm", torch.zeros(0, dtype=torch.long)).long()
            self.pos = int(ck.config.get("sampler_pos", 0))
            self.step = int(ck.step)
            self.train_time = float(ck.config.get("train_time_s", 0.0))
            self.last_ckpt_step = self.step
        self.sh_degree = trained_sh_degree(self.tcfg.to_dict(), self.rgb_step, g.sh_degree)

    def prepare(self, resume: bool, overwrite_features: bool = False) -> None:
        super().prepare(resume, overwrite_features)
        if not self.n_states:
            return
        with torch.no_grad():
            dev = next(self.codec.parameters()).device if hasattr(self.codec, "parameters") else self.device
            self.state_table = self.codec.targets(self.state_emb.to(dev)).float().to(self.device)  # [T, L']
            if self._fresh_states:  # prototypes: K-means centres of the state targets, weighted by pixels
                counts = torch.zeros(len(self.state_texts))
                for m in self.state_maps.values():
                    v = m[m >= 0]
                    counts += torch.bincount(v, minlength=len(self.state_texts)).float()
                lat = self.codec.encode(self.state_emb.to(dev)).float().cpu() if hasattr(self.codec, "encode") \
                    else self.state_table.cpu()
                keep = counts > 0
                C = _kmeans(lat[keep], counts[keep], self.n_states, seed=self.cfg.seed)
                g = torch.Generator().manual_seed(self.cfg.seed)
                noise = 0.01 * torch.randn(self.gaussians.num, self.n_states, C.shape[1], generator=g)
                self.gaussians.states.copy_((C[None] + noise).to(self.device))

    def _state_target(self, i: int) -> Tuple[Tensor, Tensor]:
        ix = self.state_maps[i].to(self.device)
        table = torch.cat([self.state_table, self.state_table.new_zeros(1, self.state_table.shape[1])])
        return table[torch.where(ix < 0, table.shape[0] - 1, ix)], ix >= 0

    def _write_config(self) -> None:
        super()._write_config()
        doc = self.rf.read_config()
        if self.n_states:
            doc["language"]["levels"] = list(self.levels) + [STATE_LEVEL]
        doc["language"]["time_sensitive"] = {"states": self.n_states, "mixer_hidden": self.mixer_hidden,
                                             "state_weight": self.state_weight, "texts": list(self.state_texts)}
        doc["model"] = self.gaussians.model_config()
        atomic_write_json(self.rf.config, doc)
        self.doc = doc

    # ---- training ---------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        c = self.cfg
        i = self._next_index()
        cams = self._cams[i]
        target, valid = self.targets.get(i)
        nl = len(self.levels)
        out = render(self.gaussians, cams, colors=False, language=True, backend=self.backend, validate=False)
        pred = out.lang[0]
        L, T = c.latent_dim, self.codec.target_dim
        loss = pred.new_zeros(())
        for li in range(nl):
            loss = loss + self.codec.loss(pred[..., li * L:(li + 1) * L], target[..., li * T:(li + 1) * T],
                                          valid[..., li])
        lang_l = float(loss.detach())
        if self.n_states:
            st, sv = self._state_target(i)
            loss = loss + self.state_weight * self.codec.loss(pred[..., nl * L:(nl + 1) * L], st, sv)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise LanguageError(f"language training stopped at step {self.step + 1}: the loss is not finite")
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": lv, "lang_l1": lang_l}

    def save_checkpoint(self) -> Path:
        g = self.gaussians
        params = list(g.splats.values()) + ([g.states] + list(g.mixer.parameters()) if g.states is not None else [])
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise LanguageError("language training produced non-finite parameters; nothing was saved")
        optim = {}
        for k, opt in self.optimizers.items():
            st = opt.state_dict()["state"]
            if st:
                optim[k] = {str(j): {n: v for n, v in s.items() if isinstance(v, Tensor)} for j, s in st.items()}
        tensors = {"splats": {k: v.detach() for k, v in g.splats.items()}, "rng": {"sampler": self.gen.get_state()},
                   "sampler": {"perm": self.perm.clone()}, **g.model_tensors()}
        if optim:
            tensors["optim"] = optim
        cfg = {"stage": "language", "rgb_step": self.rgb_step, "lang": self.cfg.to_dict(), "sampler_pos": self.pos,
               "train_time_s": self.train_time, "levels": self.levels + ([STATE_LEVEL] if self.n_states else []),
               "latent_dim": self.cfg.latent_dim, "num_gaussians": g.num, "model": g.model_config()}
        p = self.rf.store("language", self.cfg.keep_checkpoints).save(tensors, cfg, self.step)
        self.last_ckpt_step = self.step
        return p


def train_dynamic_language(run: Union[str, Path], config: Optional[LangConfig] = None, *, states: int = 2,
                           mixer_hidden: int = 32, state_weight: float = 1.0, resume: bool = False,
                           overwrite: bool = False, evaluate: bool = True, log=print, extractor=None,
                           **options) -> Dict[str, Any]:
    """Add (``resume``: continue) the language stage of a dynamic run: time-agnostic latents and,
    with ``states`` >= 2, the time-sensitive field. Returns ``{"step", "train_time_s", "metrics"}``
    (``metrics``: :func:`evaluate_dynamic_run` when ``evaluate``)."""
    run = Path(run)
    rf = RunFolder(run)
    cfg = replace(config or LangConfig(), **options)
    try:
        cfg.validate()
    except ValueError as e:
        raise LanguageError(str(e)) from None
    with rf.lock():
        if overwrite and (run / "language").exists():
            dest = rf.move_aside(("language", "autoencoder.safetensors", "autoencoder.json"),
                                 prefix="replaced-language")
            log(f"[language] moved the previous language stage to {dest}")
        tr = DynamicLanguageTrainer(run, cfg, states=states, mixer_hidden=mixer_hidden, state_weight=state_weight,
                                    log=log, extractor=extractor)
        tr.prepare(resume=resume, overwrite_features=overwrite)
        tr.train()
        if tr.last_ckpt_step != tr.step:
            tr.save_checkpoint()
    result: Dict[str, Any] = {"step": tr.step, "train_time_s": tr.train_time, "metrics": None}
    if evaluate:
        result["metrics"] = evaluate_dynamic_run(run, device=cfg.device, log=log)
    return result


# ------------------------------------------------------------------------------------------
# evaluation

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def time_sensitive_metrics(frames: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """4D LangSplat's time-sensitive metrics from per-(query, frame) records ``{"text",
    "pred": bool, "gt": bool, "pred_mask": [H, W] bool | None, "gt_mask": [H, W] bool | None}``:
    ``acc`` = mean of pred == gt over all records; per query ``viou`` = sum over the frames in
    pred ∪ gt of the mask IoU (0 where only one side holds) / their count; ``viou`` = the mean
    over queries that hold somewhere (in prediction or truth)."""
    if not frames:
        return {"acc": None, "viou": None, "queries": {}}
    per: Dict[str, List[Dict[str, Any]]] = {}
    for r in frames:
        per.setdefault(r["text"], []).append(r)
    qs = {}
    for text, rs in per.items():
        union = [r for r in rs if r["pred"] or r["gt"]]
        ious = [(_iou(r["pred_mask"], r["gt_mask"]) if (r["pred"] and r["gt"]) else 0.0) for r in union]
        qs[text] = {"acc": float(np.mean([r["pred"] == r["gt"] for r in rs])),
                    "viou": float(sum(ious) / len(union)) if union else None,
                    "frames_pred": [r.get("time") for r in rs if r["pred"]],
                    "frames_gt": [r.get("time") for r in rs if r["gt"]]}
    vs = [q["viou"] for q in qs.values() if q["viou"] is not None]
    return {"acc": float(np.mean([r["pred"] == r["gt"] for r in frames])),
            "viou": float(np.mean(vs)) if vs else None, "queries": qs}


def _queries_doc(data: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    from langfield.train.language import find_queries

    p = find_queries(data)
    if p is None:
        return None
    try:
        return p, json.loads(Path(p).read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{p}: not valid JSON ({e})") from None


def evaluate_dynamic_run(run: Union[str, Path], queries: Optional[Union[str, Path]] = None, *, device: str = "auto",
                         threshold: float = 0.4, hold_threshold: float = 0.55, rgb: bool = True,
                         log=print, write: bool = True) -> Dict[str, Any]:
    """Metrics of a dynamic run (see the module docstring), merged into ``RUN/metrics.json``
    under ``dynamic`` when ``write``. ``queries``: a ``queries.json`` (default: the dataset's)."""
    from langfield.eval.language import QuerySet, QueryView, match_camera, resize_mask, evaluate_field, \
        load_queries
    from langfield.field import LanguageField

    run = Path(run)
    field = LanguageField.load(run, device=device)
    doc = RunFolder(run).read_config()
    out: Dict[str, Any] = {"step": field.step, "stage": field.stage}
    if rgb:
        from langfield.eval.views import eval_background, evaluate_views
        from langfield.run import load_run_dataset

        ds = load_run_dataset(doc)
        test = ds.indices("test") or ds.indices("val")
        bg = eval_background(doc.get("dataset", {}).get("background", "black"))
        if test:
            r = evaluate_views(field.gaussians, ds, test, background=bg, sh_degree=field.sh_degree,
                               backend=field.backend)
            out["rgb"] = {"psnr": r["psnr"], "ssim": r["ssim"], "n_views": r["n_views"],
                          "pairs": [{"name": v["name"], "time": ds.frames[v["index"]].time, "psnr": v["psnr"]}
                                    for v in r["views"]]}
    if field.has_language:
        qd = (Path(queries), json.loads(Path(queries).read_text("utf-8"))) if queries is not None \
            else _queries_doc(Path(doc["data"]))
        if qd is not None:
            qpath, qdoc = qd
            sensitive = {q["text"] for v in qdoc.get("views", []) for q in v.get("queries", [])
                         if q.get("time_sensitive")}
            qs = load_queries(qpath)
            agnostic = QuerySet(qs.source, [QueryView(v.name, [q for q in v.queries if q.text not in sensitive], [])
                                            for v in qs.views])
            ta = evaluate_field(field, agnostic, threshold=threshold, three_d=False, log=log)
            out["time_agnostic"] = {"miou": ta["all"].get("miou"), "loc": ta["all"].get("loc"),
                                    "summary": ta["all"], "n_views": ta["n_views"]}
            if STATE_LEVEL in field.levels and sensitive:
                texts = sorted(sensitive)
                recs = []
                for v, qv in zip(qdoc["views"], qs.views):
                    cam = match_camera(field.cameras, qv.name)
                    if cam is None:
                        continue
                    r = field.render_camera(cam)
                    H, W = r.size
                    gts = {q.text: resize_mask(q.mask, H, W) for q in qv.queries if q.text in sensitive}
                    res = field.query(r, texts, level=STATE_LEVEL, threshold=threshold)
                    for text, q in zip(texts, res):
                        score = float(q.scores[q.level_index])
                        gm = gts.get(text)
                        gt = gm is not None and bool(gm.any())
                        pred = score >= hold_threshold
                        recs.append({"text": text, "time": cam.time, "view": qv.name, "score": score,
                                     "pred": pred, "gt": gt, "pred_mask": q.mask.cpu().numpy() if pred else None,
                                     "gt_mask": gm if gt else None})
                ts = time_sensitive_metrics(recs)
                ts["hold_threshold"] = hold_threshold
                ts["n_frames"] = len({r["view"] for r in recs})
                out["time_sensitive"] = ts
    if write:
        update_metrics(run, out, key="dynamic")
    return out
