"""Language over time on a dynamic run (4D LangSplat's two fields on deformable Gaussians).

* **Time-agnostic field**: per-Gaussian latents of every level, trained as
  :mod:`langfield.train.language` does (features -> codec targets -> masked per-level loss),
  but rendered with the *deformed* geometry at each training frame's time. "the box" is found
  at any time.
* **Time-sensitive field** (``states=K > 0``): K state prototypes per Gaussian (latents of
  the run's codec) mixed by a small network of the deformation feature at ``t`` (plus an
  encoding of ``t``) and per-Gaussian temporal logits (R bins over t, linearly interpolated;
  ``time_bins``, default one per training time up to 32):
  ``softmax(mixer(feature(x, t), t) + logits_n(t)) @ prototypes``. Rendered as one more level,
  ``state``, next to the time-agnostic ones (one rasterizer pass); "open box" holds only at the
  frames where the box is open.

Start (what made the switch learnable; measured on the test-sized scene: Acc 0.50 -> 0.90):
each Gaussian's deformed centre is projected into every training frame and kept where visible
(depth test against the render); the time-agnostic latents start at the mean target seen
there; the prototypes of a Gaussian are the latents of the K texts it sees most (the global
K-means centres of the state targets where it saw none); the mixer and the temporal logits are
fitted by cross-entropy to pick, at each frame's time, the prototype of the text seen then.
The rendered loss refines all of it. (A symmetric start, every Gaussian with the same centres
and a near-uniform mixer, let the prototypes average the states and the mixer collapse onto
one.) The codec is fitted with the state texts' embeddings as many rows as the features
(``STATE_ROWS``): "open box" / "closed box" share words and, as rare rows of a 3-D latent,
decoded to one vector (with half as many rows and 600 steps, one of two fits of the
test-sized scene still merged the box's states: even perfect state latents then never hold).

State supervision: per training frame a label map of *state texts*: for langfield's dynamic
scenes (``scene.json`` names a built-in scene) each state active at the frame's time
(``Scene.state_queries(t)``: "red light" on the traffic light before t = 0.5, "open box" on
the box from 0.35 to 0.8, "moving toy car" from 0.25 to 0.75, ...) over its pixels, every other
object pixel its whole-level name (time-agnostic context), background pixels the zero
latent (:data:`BACKGROUND`; without it, the Gaussians painting the sky keep state prototypes
and decode to state texts).

Evaluation (:func:`evaluate_dynamic_run`): PSNR / SSIM on the held-out (view, time) pairs;
time-agnostic mIoU / localisation per frame (:func:`langfield.eval.language.evaluate_field` on
the queries that are not time-sensitive, each view rendered at its time); time-sensitive frame
accuracy and vIoU as 4D LangSplat defines them, with a *relative* hold rule
(:func:`state_holds`): a state text holds at a frame when, on enough pixels, its smoothed
relevancy beats the best of the other states of the same object (``queries.json``
``time_sensitive.<text>.competitors``) by ``hold_margin``, and on more pixels than any of those
(the states of one object exclude each other); its mask is the same test on the raw relevancy.
Acc = the fraction of (query, frame) pairs where prediction and truth agree; vIoU of a query =
sum of the mask IoUs over the frames in prediction ∪ truth divided by their count (IoU 0 where
only one side holds); reported means over queries. (An absolute threshold cannot work: the
pair's texts share words, so each is relevant to the other's pixels too.) The main numbers are
on the dataset's test split: for langfield's scenes made with ``holdout="times"``, held-out
times of cameras seen in training (4D LangSplat evaluates on frames of the training videos);
a camera never trained on (split val, ``queries_val.json``) is reported apart
(``unseen_camera``).
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
STATE_ROWS = 1.0
"""Rows of state-text embeddings in the codec fit, as a fraction of the feature rows."""
EXCLUSIVE = True
HOLD_MARGIN = 0.1  # a state text wins a pixel when it beats its object's other states by this much
HOLD_FRACTION = 0.001  # ... and holds when it wins at least this fraction of the image
"""The states of one object exclude each other: of those that pass the pixel count, only the
one with the largest smoothed margin holds (measured, 96x96 bench run: Acc 0.81 -> 0.94 against
both holding; 0.81 when the most winning pixels decide, as blends with the background at an
object's border read as the other state)."""
BACKGROUND = -2
"""Label of background pixels (no object) in the state label maps: their state-level target is
the zero latent (what an empty pixel renders). Unsupervised there (before session 7), the
Gaussians that paint the sky kept the prototypes they started with, the K-means centres of the
state texts, and with 3000 RGB steps (the sky covered, alpha > 0.5) the "closed box" / "red
light" masks took in 200-500 background pixels each (vIoU 0.53 / 0.55 against 0.92 / 0.74
with 1500 steps). (A "background" text as the target instead, fitted into the 3-D codec with
the state texts, merged "open box" and "closed box": box vIoU 0.0.) Gaussians that see no
object start with zero prototypes."""
MASK_BLEND = 0.0
"""Weight of the smoothed relevancy in a state query's mask (the rest: the raw relevancy)."""

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
    map [H, W] into ``texts`` (:data:`BACKGROUND` on background pixels) at the frame's time (see
    the module docstring)."""
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
        out = np.full((H, W), BACKGROUND, dtype=np.int64)
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
                 state_weight: float = 1.0, mixer_lr: float = 1e-3, time_bins: int = -1, log=print,
                 extractor=None):
        super().__init__(run, cfg, log=log, extractor=extractor)
        if (self.doc.get("model") or {}).get("kind") != "deformable":
            raise LanguageError(f"{self.rf.config}: not a dynamic run (no deformable model); use the language stage "
                                f"of `langfield train`")
        if states < 0 or states == 1:
            raise LanguageError(f"--states must be 0 (off) or >= 2, got {states}")
        self.n_states = int(states)
        self.mixer_hidden = int(mixer_hidden)
        self.state_weight = float(state_weight)
        self.mixer_lr = float(mixer_lr)
        self.time_bins = int(time_bins)
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
            key["state_rows"] = STATE_ROWS
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
            n = 0
            for i in self.train_idx:
                fm = self.cache.load(self._frame_name(i))
                for lv in self.cache.levels:
                    f = fm.levels[lv].features
                    n += f.reshape(-1, f.shape[-1]).shape[0]
                    yield f.reshape(-1, f.shape[-1])
            if self.n_states:
                # the state texts, together as many rows as the features: the pairs of one
                # object share words ("open box" / "closed box"), and a 3-D latent fitted with
                # them as rare rows decodes both to nearly the same vector (measured on the
                # test-sized scene: relevancy margin 0.0 with ~9 % of the rows; with ~33 % and
                # 600 steps 0.02-0.37, one fit of two merging the box; with 50 % and 1000 steps
                # 0.26-0.37 and the features' mean reconstruction cosine 0.99)
                rep = max(16, int(math.ceil(STATE_ROWS * n / max(len(self.state_texts), 1))))
                yield self.state_emb.repeat(rep, 1)

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
        self._fresh_lang = ck is None
        if "lang" not in g.splats or g.splats["lang"].shape[1] != n_lang or ck is None:
            g.set_lang(torch.zeros(g.num, n_lang, device=self.device), requires_grad=True)
        else:
            g.splats["lang"].requires_grad_(True)
        fresh_states = False
        if self.n_states:
            if g.states is None or ck is None or g.states.shape[1] != self.n_states:
                torch.manual_seed(c.seed)
                mixer = StateMixer(g.deform.cfg.hidden, self.n_states, self.mixer_hidden)
                R = self.time_bins
                if R < 0:  # auto: one bin per distinct training time, at most 32
                    R = min(32, len({round(float(self.ds.frames[i].time), 6) for i in self.train_idx}))
                tl = torch.zeros(g.num, R, self.n_states) if R >= 2 else None
                g.set_states(torch.zeros(g.num, self.n_states, c.latent_dim), mixer, time_logits=tl)
                fresh_states = True
            g.states.requires_grad_(True)
            for p in g.mixer.parameters():
                p.requires_grad_(True)
            if g.time_logits is not None:
                g.time_logits.requires_grad_(True)
        else:
            g.set_states(None)
        self.gaussians = g
        self._fresh_states = fresh_states
        self.optimizers = {"lang": torch.optim.Adam([{"params": [g.splats["lang"]], "lr": c.lr, "name": "lang"}],
                                                    eps=1e-15)}
        if self.n_states:
            self.optimizers["states"] = torch.optim.Adam([{"params": [g.states], "lr": c.lr, "name": "states"}],
                                                         eps=1e-15)
            self.optimizers["mixer"] = torch.optim.Adam([{"params": list(g.mixer.parameters()), "lr": self.mixer_lr,
                                                          "name": "mixer"}], eps=1e-15)
            if g.time_logits is not None:
                self.optimizers["time_logits"] = torch.optim.Adam(
                    [{"params": [g.time_logits], "lr": self.mixer_lr, "name": "time_logits"}], eps=1e-15)
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
        self._votes = None
        if self._fresh_lang:
            # time-agnostic latents start at the mean target of the views where each Gaussian is
            # visible (from zeros, a few hundred steps leave most of them far from their labels)
            self._votes = self._state_votes()
            init = getattr(self, "_lang_init", None)
            if init is not None:
                mean, seen = init
                with torch.no_grad():
                    lang = self.gaussians.splats["lang"]
                    cur = lang.detach().reshape(self.gaussians.num, len(self.levels), -1).clone()
                    cur[seen.to(cur.device)] = mean.to(cur.device)[seen.to(cur.device)]
                    lang.copy_(cur.reshape(lang.shape))
                self.log(f"[language] time-agnostic latents of {int(seen.any(1).sum())} Gaussians start at their "
                         f"views' mean target")
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
        if self._fresh_states:
            with torch.enable_grad():
                rep = self._init_states_from_views(lat, C)
            self.log(f"[language] state prototypes from the views: {rep}")

    @torch.no_grad()
    def _state_votes(self) -> Tuple[Tensor, List[Tuple[int, float, Tensor, Tensor]]]:
        """What each Gaussian sees of the state labels: its deformed centre projected into every
        training frame, kept where it is visible (in the image, in front, its depth within 5 %
        of the rendered depth there). Returns ``(counts [N, T], [(frame, t, gaussian ids,
        text ids)])`` (T = the state texts plus the whole-level names)."""
        g = self.gaussians
        T = len(self.state_texts)
        counts = torch.zeros(g.num, T)
        obs = []
        nl, L = len(self.levels), self.cfg.latent_dim
        lat_init = getattr(self.codec, "target_dim", None) == L  # targets are latents: average them
        lsum = torch.zeros(g.num, nl, L) if lat_init else None
        lcnt = torch.zeros(g.num, nl) if lat_init else None
        for i in self.train_idx:
            cams = self._cams[i]
            t = float(self.ds.frames[i].time)
            a = g.activated(t)
            out = render(g, cams, t=t, colors=True, depth=True, backend=self.backend, validate=False)
            dep, alpha = out.depth[0].float().cpu(), out.alpha[0].float().cpu()
            vm, K = cams.viewmats[0].float().cpu(), cams.Ks[0].float().cpu()
            pc = a.means.detach().float().cpu() @ vm[:3, :3].T + vm[:3, 3]
            z = pc[:, 2]
            H, W = dep.shape[:2]
            u = (K[0, 0] * pc[:, 0] / z.clamp_min(1e-6) + K[0, 2]).floor().long()
            v = (K[1, 1] * pc[:, 1] / z.clamp_min(1e-6) + K[1, 2]).floor().long()
            ok = (z > 1e-3) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            ids = ok.nonzero().squeeze(1)
            uu, vv = u[ids], v[ids]
            d = dep.reshape(H, W)[vv, uu]
            vis = (alpha.reshape(H, W)[vv, uu] > 0.5) & ((z[ids] - d).abs() <= 0.05 * d + 1e-4)
            ids, uu, vv = ids[vis], uu[vis], vv[vis]
            if lat_init:
                target, valid = self._agnostic_target(i)
                tg = target.float().cpu()[vv, uu].reshape(-1, nl, L)
                va = valid.cpu()[vv, uu].reshape(-1, nl).float()
                lsum.index_add_(0, ids, tg * va[..., None])
                lcnt.index_add_(0, ids, va)
            if not self.n_states:
                continue
            lab = self.state_maps[i][vv, uu]
            keep = lab >= 0
            ids, lab = ids[keep], lab[keep]
            counts.index_put_((ids, lab), torch.ones(len(ids)), accumulate=True)
            obs.append((i, t, ids, lab))
        if lat_init:
            self._lang_init = (lsum / lcnt.clamp_min(1)[..., None], lcnt > 0)
        return counts, obs

    def _init_states_from_views(self, lat: Tensor, C: Tensor, steps: int = 500) -> Dict[str, float]:
        """Per-Gaussian prototypes and a pre-trained mixer (the symmetric start, every Gaussian
        with the same global centres and a near-uniform mixer, leaves the prototypes averaging
        the states and the mixer collapsing onto one of them): prototype k of a Gaussian is the
        latent of the k-th most often seen text of the views where it is visible (the global
        K-means centres where it saw fewer than K); the mixer is then fitted, by cross-entropy
        on the deformation feature (and encoding) at each frame's time, to pick the prototype
        of the text seen there. The rendered loss refines both afterwards."""
        g = self.gaussians
        K = self.n_states
        counts, obs = self._votes if self._votes is not None else self._state_votes()
        top_n, top_i = counts.topk(min(K, counts.shape[1]), dim=1)
        seen = top_n > 0
        protos = C[None].repeat(g.num, 1, 1).clone()
        protos[~seen[:, 0]] = 0.0  # no object seen (the sky, the background): the zero latent
        protos[seen] = lat[top_i[seen]]
        one = seen[:, 0] & ~seen.all(1)  # saw fewer than K texts: the unseen slots repeat the first
        protos[one] = torch.where(seen[one][..., None], protos[one], lat[top_i[one, 0]][:, None])
        gen = torch.Generator().manual_seed(self.cfg.seed)
        protos = protos + 0.01 * torch.randn(protos.shape, generator=gen)
        g.states.data.copy_(protos.to(self.device))
        # the classification samples: (frame, gaussian, prototype index of the seen text)
        feats, labels, texts_of, gids, tims = [], [], [], [], []
        choice = seen.sum(1) >= 2  # Gaussians that saw more than one text: the mixer has to choose
        for i, t, ids, lab in obs:
            ids, lab = ids[choice[ids]], lab[choice[ids]]
            m = (top_i[ids] == lab[:, None]) & seen[ids]
            hit = m.any(1)
            if not hit.any():
                continue
            ids, k = ids[hit], m[hit].float().argmax(1)
            with torch.no_grad():
                f = g.deformation(t).feature[ids.to(self.device)]
                x = torch.cat([f, g.mixer.encode_t(t, len(ids), f)], -1)
            feats.append(x)
            labels.append(k.to(self.device))
            texts_of.append(lab[hit])
            gids.append(ids)
            tims.append(torch.full((len(ids),), float(t)))
        if not feats:
            return {"samples": 0}
        X, Y = torch.cat(feats), torch.cat(labels)
        G = torch.cat(gids).to(self.device)
        tl = g.time_logits
        if tl is not None:  # sample -> (bin, weight) of the linear interpolation at its time
            R = tl.shape[1]
            xb = torch.cat(tims).clamp(0, 1) * (R - 1)
            i0 = xb.floor().long().clamp(max=max(R - 2, 0)).to(self.device)
            wb = (xb.to(self.device) - i0).clamp(0, 1)[:, None]
            i1 = (i0 + 1).clamp(max=R - 1)

        def logits(idx):
            z = g.mixer.net(X[idx])
            if tl is not None:
                gi = G[idx]
                z = z + (1 - wb[idx]) * tl[gi, i0[idx]] + wb[idx] * tl[gi, i1[idx]]
            return z

        groups = [{"params": list(g.mixer.parameters()), "lr": 1e-2}]
        if tl is not None:
            groups.append({"params": [tl], "lr": 0.1})
        opt = torch.optim.Adam(groups)
        bs = min(len(X), 8192)
        loss = torch.zeros(())
        for s in range(steps):
            idx = torch.randint(0, len(X), (bs,), generator=gen).to(self.device)
            loss = torch.nn.functional.cross_entropy(logits(idx), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            right = (logits(torch.arange(len(X), device=self.device)).argmax(1) == Y).float().cpu()
            acc = float(right.mean())
            tx = torch.cat(texts_of)
            per_text = {self.state_texts[j]: round(float(right[tx == j].mean()), 3) for j in tx.unique().tolist()}
            self.log(f"[language] mixer accuracy per seen text: {per_text}")
        return {"samples": int(len(X)), "mixer_acc": round(acc, 4), "mixer_loss": round(float(loss.detach()), 4),
                "gaussians_seen": int(seen[:, 0].sum()), "gaussians_choosing": int(choice.sum())}

    def _agnostic_target(self, i: int) -> Tuple[Tensor, Tensor]:
        """The time-agnostic levels' targets of frame ``i`` with background pixels (no object:
        :data:`BACKGROUND` in the state maps) valid, their target the zero latent, as on the state
        level: otherwise the Gaussians painting the sky are unsupervised there and answer
        queries with whatever their latents drifted to (mIoU 0.29 -> 0.18 once 3000 RGB steps
        painted the sky)."""
        target, valid = self.targets.get(i)
        if i in self.state_maps:
            bg = (self.state_maps[i].to(valid.device) == BACKGROUND)
            if tuple(bg.shape) == tuple(valid.shape[:2]):
                valid = valid | bg[..., None]
                target = torch.where(bg[..., None], target.new_zeros(()), target)
        return target, valid

    def _state_target(self, i: int) -> Tuple[Tensor, Tensor]:
        ix = self.state_maps[i].to(self.device)
        table = torch.cat([self.state_table, self.state_table.new_zeros(1, self.state_table.shape[1])])
        return table[torch.where(ix < 0, table.shape[0] - 1, ix)], (ix >= 0) | (ix == BACKGROUND)

    def _write_config(self) -> None:
        super()._write_config()
        doc = self.rf.read_config()
        if self.n_states:
            doc["language"]["levels"] = list(self.levels) + [STATE_LEVEL]
        doc["language"]["time_sensitive"] = {"states": self.n_states, "mixer_hidden": self.mixer_hidden,
                                             "state_weight": self.state_weight, "mixer_lr": self.mixer_lr,
                                             "time_bins": self.time_bins, "texts": list(self.state_texts)}
        doc["model"] = self.gaussians.model_config()
        atomic_write_json(self.rf.config, doc)
        self.doc = doc

    # ---- training ---------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        c = self.cfg
        i = self._next_index()
        cams = self._cams[i]
        target, valid = self._agnostic_target(i)
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
        tensors = {"splats": {k: v.detach() for k, v in g.to_dict().items()}, "rng": {"sampler": self.gen.get_state()},
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
                           mixer_hidden: int = 32, state_weight: float = 1.0, mixer_lr: float = 1e-3,
                           time_bins: int = -1, resume: bool = False,
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
                                    mixer_lr=mixer_lr, time_bins=time_bins, log=log, extractor=extractor)
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


def state_groups(data: Union[str, Path], qdoc: Optional[Dict[str, Any]] = None) -> Dict[str, Optional[List[str]]]:
    """The texts a dataset declares as states of an object, each with its competitors (the other
    states of the same object): ``queries.json`` ``time_sensitive.<text>.competitors`` (``qdoc``,
    its parsed document), else the ``states`` of the ``labels.json`` object it belongs to; None
    for a time-sensitive text that neither file groups. Unreadable files count as absent."""
    groups: Dict[str, Optional[List[str]]] = {}
    ts = (qdoc or {}).get("time_sensitive")
    if isinstance(ts, dict):
        for t, e in ts.items():
            c = e.get("competitors") if isinstance(e, dict) else None
            groups[str(t)] = [str(x) for x in c] if isinstance(c, list) else None
    lp = Path(data) / "labels.json"
    try:
        objs = json.loads(lp.read_text("utf-8")).get("objects", []) if lp.is_file() else []
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        objs = []
    for o in objs if isinstance(objs, list) else []:
        st = [str(x) for x in (o.get("states") or [])] if isinstance(o, dict) else []
        for t in st:
            if groups.get(t) is None:
                groups[t] = [c for c in st if c != t]
    return groups


def state_competitors(data: Union[str, Path], texts: Sequence[str],
                      qdoc: Optional[Dict[str, Any]] = None) -> Dict[str, List[str]]:
    """For each time-sensitive text, the other states of the same object (:func:`state_groups`);
    a text no file groups competes with every other given text."""
    groups = state_groups(data, qdoc)
    return {t: g if (g := groups.get(t)) is not None else [c for c in texts if c != t] for t in texts}


def state_holds(field, render, texts: Sequence[str], competitors: Dict[str, List[str]], *,
                margin: float = HOLD_MARGIN, min_fraction: float = HOLD_FRACTION, min_alpha: float = 0.5,
                mask_blend: Optional[float] = None, exclusive: Optional[bool] = None) -> List[Dict[str, Any]]:
    """The relative hold rule of time-sensitive queries on one render (at one time): per text,
    the state level's relevancy minus the best of its competitors' (the other states of the
    same object), per pixel. A text *wins* a pixel when it leads by more than ``margin`` and its
    own relevancy is above 0.5 (nearer the text than every canonical phrase). It *holds* when
    it wins at least ``min_fraction`` of the image (and 1 pixel) on the smoothed maps and, with
    ``exclusive`` (default :data:`EXCLUSIVE`), its largest smoothed margin (``score``) is no
    smaller than any competitor's: the states of one object exclude each other. Its mask: the
    pixels it wins on ``mask_blend * smoothed + (1 - mask_blend) * raw`` relevancy (default
    :data:`MASK_BLEND`: raw; the mean filter grows or erodes a small object by its half-width)
    that are also in LangSplat's normalised mask of the text (the top of its relevancy range in
    the image: without it, pixels of other objects that happen to prefer one state over the
    other join the mask), falling back to the smoothed wins where that leaves nothing. No
    absolute relevancy threshold: the state texts of one object share words ("open box" /
    "closed box"), so each is relevant to the other's pixels too; what decides is which of them
    the field prefers. Returns ``[{"text", "holds", "score", "pixels", "mask"}]``."""
    mask_blend = MASK_BLEND if mask_blend is None else float(mask_blend)
    exclusive = EXCLUSIVE if exclusive is None else bool(exclusive)
    allq = list(dict.fromkeys(list(texts) + [c for t in texts for c in competitors.get(t, [])]))
    res = field.query(render, allq, level=STATE_LEVEL)
    sm = {t: q.smoothed[q.level_index] for t, q in zip(allq, res)}
    raw = {t: q.relevancy[q.level_index] for t, q in zip(allq, res)}
    top = {t: q.masks[q.level_index] for t, q in zip(allq, res)}
    valid = render.alpha > min_alpha if min_alpha > 0 else torch.ones_like(sm[allq[0]], dtype=torch.bool)
    H, W = sm[allq[0]].shape
    need = max(1, int(math.ceil(min_fraction * H * W)))

    def wins(maps, t):
        others = [maps[c] for c in competitors.get(t, []) if c in maps]
        best = torch.stack(others).max(0).values if others else torch.full_like(maps[t], 0.5)
        diff = torch.where(valid, maps[t] - best, torch.full_like(best, -1.0))
        return (diff > margin) & (maps[t] > 0.5), diff

    won = {t: wins(sm, t) for t in allq}
    score = {t: float(d.max()) for t, (_w, d) in won.items()}
    mixed = raw if mask_blend == 0 else {c: mask_blend * sm[c] + (1 - mask_blend) * raw[c] for c in allq}
    out = []
    for t in texts:
        win = won[t][0]
        holds = int(win.sum()) >= need
        if exclusive and holds:
            holds = all(score[t] >= score[c] for c in competitors.get(t, []) if c in score)
        mask = wins(mixed, t)[0] & top[t]
        if not bool(mask.any()):
            mask = win
        out.append({"text": t, "holds": holds, "score": score[t], "pixels": int(mask.sum()), "mask": mask})
    return out


def _queries_doc(data: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    from langfield.train.language import find_queries

    p = find_queries(data)
    if p is None:
        return None
    try:
        return p, json.loads(Path(p).read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{p}: not valid JSON ({e})") from None


def _language_metrics(field, data: Path, qpath: Path, qdoc: Dict[str, Any], *, threshold: float, hold_margin: float,
                      hold_fraction: float, log=print, keep=None) -> Dict[str, Any]:
    """Time-agnostic mIoU / localisation and time-sensitive Acc / vIoU of ``field`` on the views
    of one queries file (those whose camera ``keep(camera)`` accepts, when given)."""
    from langfield.eval.language import QuerySet, QueryView, match_camera, resize_mask, evaluate_field, \
        load_queries

    out: Dict[str, Any] = {}
    sensitive = {q["text"] for v in qdoc.get("views", []) for q in v.get("queries", []) if q.get("time_sensitive")}
    qs = load_queries(qpath)
    if keep is not None:
        def kept(name):
            cam = match_camera(field.cameras, name)
            return cam is not None and keep(cam)

        pairs = [(v, qv) for v, qv in zip(qdoc.get("views", []), qs.views) if kept(qv.name)]
        qdoc = {**qdoc, "views": [v for v, _ in pairs]}
        qs = QuerySet(qs.source, [qv for _, qv in pairs])
        if not qs.views:  # none kept (the caller reports it when nothing at all was measured)
            return out
    agnostic = QuerySet(qs.source, [QueryView(v.name, [q for q in v.queries if q.text not in sensitive], [])
                                    for v in qs.views])
    ta = evaluate_field(field, agnostic, threshold=threshold, three_d=False, log=log)
    out["time_agnostic"] = {"miou": ta["all"].get("miou"), "loc": ta["all"].get("loc"), "summary": ta["all"],
                            "n_views": ta["n_views"]}
    ts_doc = qdoc.get("time_sensitive")
    if isinstance(ts_doc, dict):
        sensitive |= {str(t) for t in ts_doc}
    if STATE_LEVEL in field.levels and sensitive:
        texts = sorted(sensitive)
        comp = state_competitors(data, texts, qdoc)
        recs = []
        for v, qv in zip(qdoc["views"], qs.views):
            cam = match_camera(field.cameras, qv.name)
            if cam is None:
                continue
            r = field.render_camera(cam)
            H, W = r.size
            gts = {q.text: resize_mask(q.mask, H, W) for q in qv.queries if q.text in sensitive}
            for h in state_holds(field, r, texts, comp, margin=hold_margin, min_fraction=hold_fraction):
                gm = gts.get(h["text"])
                gt = gm is not None and bool(gm.any())
                pred = h["holds"]
                recs.append({"text": h["text"], "time": cam.time, "view": qv.name, "score": h["score"],
                             "pred": pred, "gt": gt, "pred_mask": h["mask"].cpu().numpy() if pred else None,
                             "gt_mask": gm if gt else None})
        ts = time_sensitive_metrics(recs)
        ts["hold_rule"] = {"margin": hold_margin, "min_fraction": hold_fraction,
                           "competitors": {t: comp[t] for t in texts}}
        ts["n_frames"] = len({r["view"] for r in recs})
        out["time_sensitive"] = ts
    return out


def evaluate_dynamic_run(run: Union[str, Path], queries: Optional[Union[str, Path]] = None, *, device: str = "auto",
                         threshold: float = 0.4, hold_margin: float = HOLD_MARGIN, hold_fraction: float = HOLD_FRACTION,
                         rgb: bool = True, data: Optional[Union[str, Path]] = None, new_times_only: bool = False,
                         log=print, write: bool = True) -> Dict[str, Any]:
    """Metrics of a dynamic run (see the module docstring), merged into ``RUN/metrics.json``
    under ``dynamic`` when ``write``. ``queries``: a ``queries.json`` (default: the dataset's).

    The main numbers are on the dataset's test split (for langfield's scenes made with
    ``holdout="times"``: held-out times of cameras seen in training, as 4D LangSplat evaluates on
    frames of the training videos). Where the dataset also has a val split with its own
    ``queries_val.json`` (the camera never trained on), the same metrics on it are reported
    separately under ``unseen_camera``.

    ``data``: another capture of the run's scene instead of the run's dataset (e.g. the same
    cameras at more times: ``langfield scenes make dynamic --frames 31`` beside a 16-frame
    run), in the run's world (:func:`langfield.run.open_dataset_in_run_world`); its test / val
    splits and queries files are evaluated. ``new_times_only``: only views at times the run has
    no training frame at (between its frame times). Either one writes under ``dynamic_other``."""
    from langfield.field import LanguageField, dataset_cameras
    from langfield.run import load_run_dataset, open_dataset_in_run_world

    run = Path(run)
    field = LanguageField.load(run, device=device)
    doc = RunFolder(run).read_config()
    own = Path(doc["data"])
    other = data is not None and Path(data).resolve() != own.resolve()
    data = Path(data) if data is not None else own
    seen = sorted({float(c.time) for c in field.cameras if c.split == "train" and c.time is not None})
    if new_times_only and not seen:
        raise RunError(f"{run}: the run's training frame times are unknown (its dataset {own} is missing), "
                       f"so times it never saw cannot be told apart")

    def new_time(t) -> bool:  # at least 1e-6 from every training frame time
        return t is not None and min(abs(float(t) - s) for s in seen) > 1e-6

    keep = (lambda cam: new_time(cam.time)) if new_times_only else None
    ds = None
    if other:
        ds = open_dataset_in_run_world(doc, data)
        field.cameras = dataset_cameras(ds)
    out: Dict[str, Any] = {"step": field.step, "stage": field.stage}
    if other or new_times_only:
        out.update(data=str(data), new_times_only=bool(new_times_only))
    if rgb:
        from langfield.eval.views import eval_background, evaluate_views

        ds = ds if ds is not None else load_run_dataset(doc)
        bg = eval_background(doc.get("dataset", {}).get("background", "black"))

        def rgb_metrics(idx):
            if new_times_only:
                idx = [i for i in idx if new_time(ds.frames[i].time)]
            if not idx:
                return None
            r = evaluate_views(field.gaussians, ds, idx, background=bg, sh_degree=field.sh_degree,
                               backend=field.backend)
            return {"psnr": r["psnr"], "ssim": r["ssim"], "n_views": r["n_views"],
                    "pairs": [{"name": v["name"], "time": ds.frames[v["index"]].time, "psnr": v["psnr"]}
                              for v in r["views"]]}

        test = ds.indices("test") or ds.indices("val")
        if test and (m := rgb_metrics(test)) is not None:
            out["rgb"] = m
    kw = dict(threshold=threshold, hold_margin=hold_margin, hold_fraction=hold_fraction, log=log, keep=keep)
    if field.has_language:
        qd = (Path(queries), json.loads(Path(queries).read_text("utf-8"))) if queries is not None \
            else _queries_doc(data)
        if qd is not None:
            out.update(_language_metrics(field, data, qd[0], qd[1], **kw))
    qv = data / "queries_val.json"
    if queries is None and qv.is_file():
        try:
            vdoc = json.loads(qv.read_text("utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{qv}: not valid JSON ({e})") from None
        un: Dict[str, Any] = {"note": "a camera never trained on (split val)"}
        if rgb and ds is not None and ds.indices("val") and ds.indices("test") and \
                (m := rgb_metrics(ds.indices("val"))) is not None:
            un["rgb"] = m
        if field.has_language:
            un.update(_language_metrics(field, data, qv, vdoc, **kw))
        out["unseen_camera"] = un
    if new_times_only and not _evaluated_anything(out):
        raise RunError(f"{data}: no held-out view (test / val split, queries file) is at a time the run never saw "
                       f"(its training frame times cover them); --new-times needs a capture at other times, "
                       f"e.g. --data with more frames")
    if write:
        update_metrics(run, out, key="dynamic_other" if (other or new_times_only) else "dynamic")
    return out


def metrics_headline(m: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The headline numbers of :func:`evaluate_dynamic_run`'s result, or of its
    ``unseen_camera`` part: ``psnr``, ``ssim``, ``rgb_views``, ``miou``, ``loc``,
    ``agnostic_views``, ``acc``, ``viou``, ``time_sensitive_frames``, ``per_query`` (``{text:
    {acc, viou}}``); a number that was not measured is left out."""
    m = m or {}
    r, ta, ts = m.get("rgb") or {}, m.get("time_agnostic") or {}, m.get("time_sensitive") or {}
    out = {"psnr": r.get("psnr"), "ssim": r.get("ssim"), "rgb_views": r.get("n_views"), "miou": ta.get("miou"),
           "loc": ta.get("loc"), "agnostic_views": ta.get("n_views"), "acc": ts.get("acc"), "viou": ts.get("viou"),
           "time_sensitive_frames": ts.get("n_frames"),
           "per_query": {q: {"acc": v["acc"], "viou": v["viou"]} for q, v in (ts.get("queries") or {}).items()}
           or None}
    return {k: v for k, v in out.items() if v is not None}


def _evaluated_anything(out: Dict[str, Any]) -> bool:
    """Whether a result of :func:`evaluate_dynamic_run` holds any measured view."""
    return any(h.get(k) for h in (metrics_headline(out), metrics_headline(out.get("unseen_camera")))
               for k in ("rgb_views", "agnostic_views", "time_sensitive_frames"))