"""The online mapper: RGB-D frames in, a (language) Gaussian map and camera poses out.

::

    from langfield.data.rgbd import make_frame
    from langfield.slam import Mapper, SlamConfig

    mapper = Mapper(SlamConfig(width=320, height=240))
    for i, (rgb, raw_depth, t) in enumerate(camera):          # your driver's loop
        frame = make_frame(rgb, raw_depth, K, timestamp=t, depth_scale=1000.0, index=i)
        info = mapper.step(frame)                              # track, maybe map
        print(info["index"], info["is_keyframe"], info["gaussians"])
        c2w = info["pose"]                                     # [4, 4] camera-to-world (numpy)
    gaussians = mapper.gaussians()                             # a langfield.scene.Gaussians

Each :meth:`Mapper.step` tracks the frame against the map (:mod:`langfield.slam.tracker`,
from a constant-velocity prediction), decides whether it is a keyframe
(:mod:`langfield.slam.keyframes`) and, if so, grows the map from its depth and optimises a
window of keyframes, refining their poses with it (:mod:`langfield.slam.mapper`). By default
everything runs in the calling thread and is deterministic for a given seed (the random older
keyframes come from a seeded generator): the same frames give the same map, and
:meth:`Mapper.state` / :meth:`Mapper.from_state` carry the whole state (map, Adam moments,
keyframes, trajectory, generator) for ``--resume``. With ``SlamConfig(concurrent=True)``
(``langfield slam --concurrent``) a keyframe is mapped in a back-end thread while the front end
tracks the next frames against a snapshot of the map (two cores busy instead of one; the
result then depends on thread timing); :meth:`Mapper.sync` waits for the back end, and
``state``, ``gaussians`` and the run's saves call it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from langfield.maths import inv_rigid, se3_exp
from langfield.render.model import Cameras, render
from langfield.slam.keyframes import Keyframe, KeyframeConfig, choose_window, is_keyframe
from langfield.slam.mapper import GaussianMap, MapperConfig, lrs_of, prune_mask, seed_gaussians
from langfield.scene import Activated, FixedModel
from langfield.slam.tracker import TrackerConfig, constant_velocity, rigid, scale_K, track

__all__ = ["SlamConfig", "Mapper", "prepare_frame"]


@dataclass
class SlamConfig:
    """Online mapping settings. ``width``/``height``: working size (frames are resized to it;
    None keeps the frames' size). ``init_pose``: "gt" starts the map at the first frame's
    ground-truth pose when the frame has one (the map and trajectory then live in the
    dataset's frame), "identity" at the origin."""

    width: Optional[int] = 320
    height: Optional[int] = 240
    seed: int = 0
    init_pose: str = "gt"
    backend: str = "auto"
    concurrent: bool = False  # map keyframes in a back-end thread while the front end tracks (not bit-reproducible)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)

    def to_dict(self) -> Dict[str, Any]:
        return {"width": self.width, "height": self.height, "seed": self.seed, "init_pose": self.init_pose,
                "backend": self.backend, "concurrent": self.concurrent, "tracker": self.tracker.to_dict(),
                "mapper": self.mapper.to_dict(),
                "keyframes": self.keyframes.to_dict()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SlamConfig":
        d = dict(d)
        return cls(width=d.get("width"), height=d.get("height"), seed=int(d.get("seed", 0)),
                   init_pose=str(d.get("init_pose", "gt")), backend=str(d.get("backend", "auto")),
                   concurrent=bool(d.get("concurrent", False)),
                   tracker=TrackerConfig.from_dict(d.get("tracker", {})),
                   mapper=MapperConfig.from_dict(d.get("mapper", {})),
                   keyframes=KeyframeConfig.from_dict(d.get("keyframes", {})))


def prepare_frame(frame, width: Optional[int], height: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(image [h, w, 3] float in [0, 1], depth [h, w] metres, K [3, 3])`` of an
    :class:`~langfield.data.rgbd.RGBDFrame` at the working size: integer factors average
    colour and valid depth (a block with a hole stays a hole), other sizes resample (area for
    colour, nearest for depth); K is scaled to match (pixel centres at +0.5)."""
    image = torch.from_numpy(np.array(frame.color, dtype=np.float32)) / 255.0  # a copy: frames may be read-only
    depth = torch.from_numpy(np.array(frame.depth, dtype=np.float32))
    K = torch.from_numpy(np.asarray(frame.K, dtype=np.float64)).float()
    H, W = depth.shape
    w, h = width or W, height or H
    if (w, h) == (W, H):
        return image, depth, K
    if W % w == 0 and H % h == 0 and W // w == H // h:
        from langfield.slam.tracker import pyramid, scale_K

        f = W // w
        im, d = pyramid(image, depth, f)
        return im, d, scale_K(K, f)
    im = F.interpolate(image.permute(2, 0, 1)[None], size=(h, w), mode="area")[0].permute(1, 2, 0).contiguous()
    d = F.interpolate(depth[None, None], size=(h, w), mode="nearest")[0, 0].contiguous()
    Ks = K.clone()
    Ks[0] *= w / W
    Ks[1] *= h / H
    return im, d, Ks


class Mapper:
    """Frame-by-frame tracking and mapping (see the module docstring). ``language``: an
    optional online language head (:class:`langfield.slam.language.OnlineLanguage`)."""

    def __init__(self, config: Optional[SlamConfig] = None, *, language=None, device="cpu"):
        self.config = config or SlamConfig()
        self.device = torch.device(device)
        self.map = GaussianMap(isotropic=self.config.mapper.isotropic, device=self.device)
        self.keyframes: List[Keyframe] = []
        self.timestamps: List[float] = []
        self.names: List[str] = []
        self.viewmats: List[Tensor] = []  # per frame, world-to-camera as tracked (keyframes: as refined)
        self.keyframe_of_frame: List[int] = []  # -1 or the keyframe's position
        # per frame: the keyframe it was tracked after (-1: none) and that keyframe's pose then, so later
        # refinements of the keyframe carry over to the frame (its pose relative to the keyframe is kept)
        self.ref_of_frame: List[int] = []
        self.ref_pose: List[Tensor] = []
        self.generator = torch.Generator().manual_seed(int(self.config.seed))
        self.frames_since_kf = 0
        self.frames = 0
        self.K: Optional[Tensor] = None
        self.size: Optional[Tuple[int, int]] = None
        self.language = language
        self.timing = {"track_s": 0.0, "map_s": 0.0, "tracked": 0, "mapped": 0, "lang_s": 0.0}
        self._worker: Optional[threading.Thread] = None  # the back end (concurrent mode)
        self._worker_error: Optional[BaseException] = None

    # ---- the step ---------------------------------------------------------------------------
    def step(self, frame) -> Dict[str, Any]:
        """Track ``frame`` (an :class:`~langfield.data.rgbd.RGBDFrame`), map it if it is a
        keyframe. Returns ``index``, ``timestamp``, ``pose`` (camera-to-world [4, 4] numpy),
        ``viewmat``, ``is_keyframe``, ``reason``, ``overlap``, ``track_ms``, ``map_ms``,
        ``iters``, ``coverage``, ``gaussians``, ``keyframes``."""
        cfg = self.config
        image, depth, K = prepare_frame(frame, cfg.width, cfg.height)
        image, depth, K = image.to(self.device), depth.to(self.device), K.to(self.device)
        h, w = depth.shape
        if self.size is None:
            self.size, self.K = (w, h), K
        elif self.size != (w, h):
            raise ValueError(f"frame {frame.index}: size {w}x{h} differs from the sequence's {self.size[0]}x"
                             f"{self.size[1]}")
        t0 = time.perf_counter()
        info: Dict[str, Any] = {"index": int(frame.index), "timestamp": float(frame.timestamp), "iters": 0,
                                "coverage": 1.0}
        if not self.viewmats:
            gt = getattr(frame, "camtoworld", None)
            if cfg.init_pose == "gt" and gt is not None and np.isfinite(gt).all():
                T = inv_rigid(torch.as_tensor(np.asarray(gt), dtype=torch.float64)).float().to(self.device)
            else:
                T = torch.eye(4, device=self.device)
        else:
            prev = self.pose(len(self.viewmats) - 1)
            prev2 = self.pose(len(self.viewmats) - 2) if len(self.viewmats) > 1 else None
            T0 = constant_velocity(prev.double(), None if prev2 is None else prev2.double()).float()
            res = track(self.map, image, depth, K, T0, cfg.tracker, backend=cfg.backend)
            T = res.viewmat
            info.update(iters=res.iters, coverage=res.coverage, track_loss=res.loss, renders=res.renders)
        t1 = time.perf_counter()
        self.timing["track_s"] += t1 - t0
        self.timing["tracked"] += 1 if self.viewmats else 0
        last = self.keyframes[-1] if self.keyframes else None
        kf, reason, overlap = is_keyframe(depth, K, T, last, self.frames_since_kf, info["coverage"], cfg.keyframes)
        self.viewmats.append(T.detach().clone())
        self.ref_of_frame.append(len(self.keyframes) - 1 if last is not None else -1)
        self.ref_pose.append(last.viewmat.detach().clone() if last is not None else torch.eye(4, device=self.device))
        self.timestamps.append(float(frame.timestamp))
        self.names.append(str(getattr(frame, "name", "") or f"frame_{frame.index:06d}"))
        info.update(is_keyframe=kf, reason=reason, overlap=overlap)
        map_ms = 0.0
        if kf:
            self.sync()  # concurrent mode: the back end finishes the previous keyframe first
            self.keyframes.append(Keyframe(index=len(self.viewmats) - 1, name=self.names[-1],
                                           timestamp=float(frame.timestamp), viewmat=T.detach().clone(),
                                           image=image, depth=depth))
            self.keyframe_of_frame.append(len(self.keyframes) - 1)
            self.ref_of_frame[-1], self.ref_pose[-1] = -1, torch.eye(4, device=self.device)
            self.frames_since_kf = 0
            if cfg.concurrent and len(self.keyframes) > 1:  # (the first keyframe is mapped before tracking on)
                self._worker = threading.Thread(target=self._map_job, args=(frame, len(self.keyframes) - 1),
                                                name="langfield-slam-mapping", daemon=True)
                self._worker.start()
            else:
                map_ms = self._map_job(frame, len(self.keyframes) - 1)
        else:
            self.keyframe_of_frame.append(-1)
            self.frames_since_kf += 1
        self.frames += 1
        T = self.pose(len(self.viewmats) - 1)
        info.update(pose=inv_rigid(T.double()).cpu().numpy(), viewmat=T.cpu().numpy(), track_ms=(t1 - t0) * 1000,
                    map_ms=map_ms, gaussians=self.map.num, keyframes=len(self.keyframes))
        return info

    # ---- mapping ----------------------------------------------------------------------------
    def _map_job(self, frame, kf_index: int) -> float:
        """Language features and mapping of a new keyframe; milliseconds taken."""
        t2 = time.perf_counter()
        try:
            if self.language is not None:
                self.language.on_keyframe(self, frame, kf_index)
            self._map_keyframe()
        except BaseException as e:  # noqa: BLE001 - handed to the front end by sync()
            if not self.config.concurrent:
                raise
            self._worker_error = e
        map_ms = (time.perf_counter() - t2) * 1000
        self.timing["map_s"] += map_ms / 1000
        self.timing["mapped"] += 1
        return map_ms

    def sync(self) -> None:
        """Wait for the back end (concurrent mode) to finish the keyframe it is mapping; re-raise
        its error. A no-op in the default, sequential mode."""
        w = self._worker
        if w is not None:
            w.join()
            self._worker = None
        if self._worker_error is not None:
            e, self._worker_error = self._worker_error, None
            raise e

    def _map_keyframe(self) -> None:
        cfg = self.config.mapper
        kf = self.keyframes[-1]
        seed_gaussians(self.map, kf.image, kf.depth, self.K, kf.viewmat, cfg, backend=self.config.backend)
        iters = cfg.first_iters if len(self.keyframes) == 1 else cfg.iters
        window = choose_window(len(self.keyframes), cfg.window, cfg.random_older, self.generator)
        self.optimise(window, iters)
        self.map.keep(prune_mask(self.map, cfg))

    def optimise(self, window: List[int], iters: int) -> None:
        """``iters`` mapping iterations over the keyframes ``window`` (one view per iteration,
        the newest keyframe every other iteration, the rest in turn)."""
        cfg = self.config.mapper
        lrs = lrs_of(cfg)
        w, h = self.size
        lang = self.language if (self.language is not None and self.language.ready) else None
        if lang is not None and cfg.lang_pass not in ("shared", "detached"):
            raise ValueError(f"mapper lang_pass must be 'shared' or 'detached', got {cfg.lang_pass!r}")
        frozen = () if lang is not None else ("lang",)
        order = []
        others = window[:-1]
        for it in range(iters):
            if it % 2 == 0 or not others:
                order.append(window[-1])
            else:
                order.append(others[(it // 2) % len(others)])
        for ki in order:
            kf = self.keyframes[ki]
            self.map.zero_grad()
            refine = cfg.pose_opt and ki > 0  # the first keyframe fixes the map's frame
            if refine:
                delta = torch.zeros(6, device=self.device, requires_grad=True)
                vm = se3_exp(delta) @ kf.viewmat
            else:
                vm = kf.viewmat
            a = self.map.activated()
            shared = lang is not None and cfg.lang_pass == "shared"  # latents in the colour pass: they move the geometry
            out = render(FixedModel(a), Cameras(vm[None], self.K[None], w, h), depth=True, language=shared,
                         backend=self.config.backend, validate=False)
            valid = kf.depth > 0
            nv = max(1, int(valid.sum()))
            loss = (out.rgb[0] - kf.image).abs().mean() + \
                cfg.w_depth * ((out.depth[0] - kf.depth).abs() * valid).sum() / nv
            if lang is not None:
                pred = out.lang[0] if shared else self._render_language(a, kf.viewmat)
                loss = loss + cfg.w_lang * lang.loss(pred, ki)
            loss.backward()
            self.map.adam_step(lrs, frozen=frozen)
            if refine and delta.grad is not None:
                self._pose_step(kf, delta.grad.detach(), cfg)
        for ki in set(window):  # the frames list holds the keyframes' refined poses
            self.viewmats[self.keyframes[ki].index] = self.keyframes[ki].viewmat.clone()

    def _render_language(self, a: Activated, viewmat: Tensor) -> Tensor:
        """The language latents [h, w, L] of the map ``a`` (activated) seen from ``viewmat``, at
        1 / ``lang_stride`` of the working size, with the geometry detached: the language loss
        trains the latents only, never the Gaussians' positions, sizes or opacities (nor the
        keyframe's pose), so a run with language has the geometry and trajectory of the same
        run without it. A second rasterizer pass (without colour) at a quarter of the pixels
        costs less than the colour pass carrying the latents' channels did (the renderer
        cannot yet keep chosen channels' gradients off the geometry in one pass)."""
        s = max(1, int(self.config.mapper.lang_stride))
        w, h = self.size
        geo = Activated(means=a.means.detach(), quats=a.quats.detach(), scales=a.scales.detach(),
                        opacities=a.opacities.detach(), sh=a.sh.detach(), sh_degree=a.sh_degree, lang=a.lang)
        out = render(FixedModel(geo), Cameras(viewmat.detach()[None], scale_K(self.K, s)[None], w // s, h // s),
                     colors=False, language=True, backend=self.config.backend, validate=False)
        return out.lang[0]

    @torch.no_grad()
    def _pose_step(self, kf: Keyframe, grad: Tensor, cfg, betas=(0.9, 0.999), eps: float = 1e-12) -> None:
        """One Adam step on the keyframe's twist (left update on SE(3), so it stays rigid)."""
        if kf.pose_m is None:
            kf.pose_m = torch.zeros(6, device=self.device)
            kf.pose_v = torch.zeros(6, device=self.device)
        kf.pose_steps += 1
        b1, b2 = betas
        kf.pose_m.mul_(b1).add_(grad, alpha=1 - b1)
        kf.pose_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        mh = kf.pose_m / (1 - b1 ** kf.pose_steps)
        vh = kf.pose_v / (1 - b2 ** kf.pose_steps)
        lr = torch.tensor([cfg.lr_pose_trans] * 3 + [cfg.lr_pose_rot] * 3, device=self.device)
        step = -lr * mh / (vh.sqrt() + eps)
        kf.viewmat = rigid(se3_exp(step.double()) @ kf.viewmat.double()).float()

    # ---- results ----------------------------------------------------------------------------
    def pose(self, i: int) -> Tensor:
        """World-to-camera [4, 4] of frame ``i`` now: keyframes as refined by mapping, other frames
        as tracked, moved with the later refinements of the keyframe they were tracked after."""
        r = self.ref_of_frame[i] if i < len(self.ref_of_frame) else -1
        if r < 0:
            return self.viewmats[i]
        T = self.viewmats[i].double() @ inv_rigid(self.ref_pose[i].double()) @ self.keyframes[r].viewmat.double()
        return rigid(T).float()

    def poses_c2w(self) -> np.ndarray:
        """[F, 4, 4] camera-to-world of every frame so far (see :meth:`pose`)."""
        if not self.viewmats:
            return np.zeros((0, 4, 4))
        return inv_rigid(torch.stack([self.pose(i) for i in range(len(self.viewmats))]).double()).cpu().numpy()

    def gaussians(self, with_lang: bool = True):
        """The map as :class:`langfield.scene.Gaussians`."""
        self.sync()
        return self.map.to_gaussians(with_lang=with_lang)

    def render(self, viewmat, K=None, width: Optional[int] = None, height: Optional[int] = None,
               language: bool = False):
        """Render the map now (e.g. for a query while mapping)."""
        K = self.K if K is None else torch.as_tensor(K, dtype=torch.float32)
        w, h = self.size if width is None else (width, height)
        with torch.no_grad(), self.map.lock:
            return render(self.map, Cameras.of(viewmat, K, w, h, device=self.device), depth=True, language=language,
                          backend=self.config.backend)

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """``(tensors, config)`` holding everything :meth:`from_state` needs to continue exactly."""
        self.sync()
        t = self.map.state_tensors()
        nf = len(self.viewmats)
        t["viewmats"] = torch.stack(self.viewmats).contiguous() if nf else torch.zeros((0, 4, 4))
        t["timestamps"] = torch.tensor(self.timestamps, dtype=torch.float64)
        t["keyframe_of_frame"] = torch.tensor(self.keyframe_of_frame, dtype=torch.int64)
        t["ref_of_frame"] = torch.tensor(self.ref_of_frame, dtype=torch.int64)
        t["ref_pose"] = torch.stack(self.ref_pose).contiguous() if nf else torch.zeros((0, 4, 4))
        for i, kf in enumerate(self.keyframes):
            t[f"kf{i}.viewmat"] = kf.viewmat.contiguous()
            t[f"kf{i}.image"] = kf.image.contiguous()
            t[f"kf{i}.depth"] = kf.depth.contiguous()
            if kf.pose_m is not None:
                t[f"kf{i}.pose_m"] = kf.pose_m.contiguous()
                t[f"kf{i}.pose_v"] = kf.pose_v.contiguous()
        t["generator"] = self.generator.get_state().contiguous()
        if self.K is not None:
            t["K"] = self.K.contiguous()
        cfg = {"slam": self.config.to_dict(), "map": self.map.state_config(), "frames": self.frames,
               "frames_since_kf": self.frames_since_kf, "names": list(self.names),
               "keyframes": [{"index": kf.index, "name": kf.name, "timestamp": kf.timestamp,
                              "pose_steps": kf.pose_steps} for kf in self.keyframes],
               "size": list(self.size) if self.size else None, "timing": dict(self.timing)}
        if self.language is not None:
            lt, lc = self.language.state()
            t.update({f"lang.{k}": v for k, v in lt.items()})
            cfg["language"] = lc
        return t, cfg

    @classmethod
    def from_state(cls, tensors: Dict[str, Tensor], cfg: Dict[str, Any], *, language=None,
                   device="cpu") -> "Mapper":
        m = cls(SlamConfig.from_dict(cfg["slam"]), language=language, device=device)
        m.map = GaussianMap.from_state(tensors, cfg["map"], device=device)
        m.viewmats = [v.clone() for v in tensors["viewmats"]]
        m.timestamps = [float(v) for v in tensors["timestamps"]]
        m.keyframe_of_frame = [int(v) for v in tensors["keyframe_of_frame"]]
        nf = len(m.viewmats)
        m.ref_of_frame = [int(v) for v in tensors["ref_of_frame"]] if "ref_of_frame" in tensors else [-1] * nf
        m.ref_pose = [v.clone() for v in tensors["ref_pose"]] if "ref_pose" in tensors else \
            [torch.eye(4, device=m.device) for _ in range(nf)]
        m.names = list(cfg["names"])
        m.frames = int(cfg["frames"])
        m.frames_since_kf = int(cfg["frames_since_kf"])
        m.size = tuple(cfg["size"]) if cfg.get("size") else None  # type: ignore[assignment]
        m.K = tensors.get("K")
        m.timing = dict(cfg.get("timing") or m.timing)
        m.generator.set_state(tensors["generator"].clone())
        for i, k in enumerate(cfg["keyframes"]):
            pm, pv = tensors.get(f"kf{i}.pose_m"), tensors.get(f"kf{i}.pose_v")
            m.keyframes.append(Keyframe(index=int(k["index"]), name=str(k["name"]), timestamp=float(k["timestamp"]),
                                        viewmat=tensors[f"kf{i}.viewmat"].clone(), image=tensors[f"kf{i}.image"].clone(),
                                        depth=tensors[f"kf{i}.depth"].clone(),
                                        pose_m=None if pm is None else pm.clone(),
                                        pose_v=None if pv is None else pv.clone(),
                                        pose_steps=int(k.get("pose_steps", 0))))
        if language is not None and "language" in cfg:
            language.load_state({k[5:]: v for k, v in tensors.items() if k.startswith("lang.")}, cfg["language"])
        return m
