"""Language online: features per keyframe, a codec fitted on the first keyframes then frozen,
per-Gaussian latents optimised in the mapping iterations (one rasterizer pass for colour,
depth and language).

* Each keyframe's 2D features come from an extractor (``labels`` on langfield scenes, whose
  TUM/Replica copies sit next to the label maps; ``dense-clip`` or ``sam-clip`` on real data),
  at the mapper's working size.
* After ``warmup`` keyframes the codec (``autoencoder``, ``latent_dim``) is fitted on their
  features and frozen, so latents already trained never drift; every keyframe's targets are
  then encoded once. Until then the map carries no language (queries fall back to RGB).
* The map gets ``levels x latent_dim`` latents per Gaussian (zeros for new ones) and the
  mapping loss adds the codec's per-level masked loss on the rendered latents.
* The run's config gets a ``language`` section as the language stage writes it (levels,
  latent_dim, features, text, codec), and the codec file sits in the run folder, so
  ``langfield query RUN "..."`` works on the map unchanged, at any saved moment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from langfield.run import RunError

__all__ = ["OnlineLanguage"]


class OnlineLanguage:
    """See the module docstring. Build with :meth:`create`."""

    def __init__(self, extractor, *, root: Optional[Path], label_paths: Optional[Dict[int, dict]],
                 features: str, latent_dim: int = 3, warmup: int = 3, ae_steps: Optional[int] = None, ae_batch: int = 256,
                 ae_lr: float = 1e-3, seed: int = 0, codec_kind: str = "autoencoder", device="cpu"):
        self.extractor = extractor
        self.root = root
        self.label_paths = label_paths or {}
        self.features = features
        self.latent_dim = int(latent_dim)
        self.warmup = int(warmup)
        self.kind = getattr(extractor, "kind", "regions")
        if ae_steps is None:
            # region features (labels, sam-clip) are a few dozen distinct vectors: 500 steps (7 CPU-s; `langfield
            # slam` used 1500) fit the room's first 3 keyframes to a held-out cosine of 0.957; 300 steps at lr 2e-3
            # (0.963, 3.4 CPU-s) gave a lower name-query mIoU on the mapped room (0.576 vs 0.592, 100 frames); dense
            # maps have many more vectors and keep the longer fit
            ae_steps = 500 if self.kind == "regions" else 1500
        self.ae = {"steps": int(ae_steps), "batch_size": int(ae_batch), "lr": float(ae_lr)}
        self.seed = int(seed)
        self.codec_kind = codec_kind
        self.device = torch.device(device)
        self.levels: List[str] = list(extractor.levels)
        self.raw: List[Dict[str, Any]] = []  # per keyframe: {"index": [levels, H, W] or None, "feats": [per level]}
        self.targets: List[Tuple[Tensor, Tensor]] = []  # per keyframe: (target [H, W, levels*T], valid [H, W, levels])
        self.codec = None
        self.run_dir: Optional[Path] = None  # where the codec file is written (run_slam sets it)
        self.fit_report: Dict[str, Any] = {}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, features: str, seq=None, *, device="cpu", text_encoder: str = "auto", extractor=None,
               **options) -> "OnlineLanguage":
        """For ``features`` (``labels``, ``dense-clip``, ``sam-clip``) and an RGB-D sequence
        (``labels`` needs a langfield scene: its label maps and labels.json beside the copy)."""
        root, label_paths = None, None
        if features == "labels":
            root, label_paths = _scene_labels(seq)
        if extractor is None:
            from langfield.features.factory import make_extractor

            try:
                extractor = make_extractor(features, text_encoder=text_encoder, device=device, log=lambda m: None)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise RunError(f"--features {features}: {str(e).splitlines()[0]}") from None
        return cls(extractor, root=root, label_paths=label_paths, features=features, device=device, **options)

    @property
    def ready(self) -> bool:
        return self.codec is not None

    @property
    def lang_dim(self) -> int:
        return len(self.levels) * self.latent_dim

    # ---- per keyframe --------------------------------------------------------------------------
    def _extract(self, frame, image: Tensor) -> Any:
        from langfield.features.base import FrameInfo

        H, W = image.shape[:2]
        if self.features == "labels":
            key = _frame_key(frame)
            if key not in self.label_paths:
                raise RunError(f"frame {frame.name!r}: no label maps for it in {self.root} (labels needs the scene's "
                               "label maps)")
            info = FrameInfo(name=str(frame.name), index=int(frame.index), root=self.root,
                             extras={"label_paths": self.label_paths[key]}, size=(H, W))
            return self.extractor.extract(None, info)
        info = FrameInfo(name=str(frame.name), index=int(frame.index), size=(H, W))
        with torch.no_grad():
            return self.extractor.extract(image.to(self.device), info)

    def on_keyframe(self, mapper, frame, kf_index: int) -> None:
        """Extract the new keyframe's features; fit the codec once ``warmup`` keyframes have them."""
        image = mapper.keyframes[kf_index].image
        fm = self._extract(frame, image)
        H, W = image.shape[:2]
        rec: Dict[str, Any] = {"feats": [fm.levels[lv].features.float().cpu() for lv in self.levels]}
        if fm.kind == "regions":
            idx = []
            for lv in self.levels:
                ix = fm.levels[lv].index
                if tuple(ix.shape) != (H, W):
                    ix = F.interpolate(ix[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0]
                idx.append(ix.long().to(torch.int32))
            rec["index"] = torch.stack(idx)
        else:
            rec["index"] = None
            rec["size"] = (H, W)
        self.raw.append(rec)
        if self.codec is None and len(self.raw) >= self.warmup:
            self._fit(mapper)
        elif self.codec is not None:
            self.targets.append(self._encode(rec))

    def _fit(self, mapper) -> None:
        from langfield.codec import codec_file, fit_codec

        def chunks():
            for rec in self.raw:
                for f in rec["feats"]:
                    yield f.reshape(-1, f.shape[-1])

        n = torch.get_num_threads()
        torch.set_num_threads(1)  # batches of 256 small vectors: one thread is fastest, and the map keeps the other
        try:
            codec, rep = fit_codec(self.codec_kind, chunks(), latent_dim=self.latent_dim, seed=self.seed,
                                   device=self.device, **self.ae)
        finally:
            torch.set_num_threads(n)
        self.codec = codec.to(self.device).eval()
        for p in self.codec.parameters():
            p.requires_grad_(False)
        self.fit_report = {k: v for k, v in rep.items() if isinstance(v, (int, float, str, type(None)))}
        self.fit_report["keyframes"] = len(self.raw)
        if self.run_dir is not None:
            self.codec.save(self.run_dir / codec_file(self.codec_kind))
        self.targets = [self._encode(rec) for rec in self.raw]
        mapper.map.set_lang_dim(self.lang_dim)

    def _encode(self, rec) -> Tuple[Tensor, Tensor]:
        T = self.codec.target_dim
        outs, valids = [], []
        with torch.no_grad():
            if rec["index"] is not None:
                for li, f in enumerate(rec["feats"]):
                    ix = rec["index"][li].long().to(self.device)
                    z = self.codec.targets(f.to(self.device)) if f.shape[0] else torch.zeros(0, T, device=self.device)
                    table = torch.cat([z.float(), z.new_zeros(1, T)])
                    outs.append(table[torch.where(ix < 0, table.shape[0] - 1, ix)])
                    valids.append(ix >= 0)
            else:
                H, W = rec["size"]
                for f in rec["feats"]:
                    h, w, D = f.shape
                    z = self.codec.targets(f.reshape(-1, D).to(self.device)).float()
                    z = z.reshape(h, w, T).permute(2, 0, 1)[None]
                    outs.append(F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)[0]
                                .permute(1, 2, 0))
                    valids.append(torch.ones(H, W, dtype=torch.bool, device=self.device))
        return torch.cat(outs, -1).to(self.device), torch.stack(valids, -1).to(self.device)

    def loss(self, pred: Tensor, kf_index: int) -> Tensor:
        """The codec's loss summed over levels: rendered latents [h, w, levels*L] vs the
        keyframe's targets. Latents rendered at 1 / s of the targets' size (``H == s * h``) meet
        the target pixel nearest each rendered pixel's centre (rows and columns ``s // 2 + s * i``)."""
        target, valid = self.targets[kf_index]
        H, W = target.shape[:2]
        h, w = pred.shape[:2]
        if (h, w) != (H, W):
            s = H // h
            if s < 1 or W // w != s:
                raise ValueError(f"language loss: latents rendered at {w}x{h} do not divide the targets' {W}x{H}")
            o = s // 2
            target, valid = target[o::s, o::s][:h, :w], valid[o::s, o::s][:h, :w]
        L, T = self.latent_dim, self.codec.target_dim
        total = pred.new_zeros(())
        for li in range(len(self.levels)):
            total = total + self.codec.loss(pred[..., li * L:(li + 1) * L], target[..., li * T:(li + 1) * T],
                                            valid[..., li])
        return total

    # ---- run folder ----------------------------------------------------------------------------
    def config_section(self) -> Dict[str, Any]:
        from langfield.codec import codec_file

        f = codec_file(self.codec_kind)
        ex = self.extractor
        return {"levels": self.levels, "latent_dim": self.latent_dim, "features": self.features,
                "feature_kind": self.kind, "feature_config": ex.config() if hasattr(ex, "config") else {},
                "text": ex.text_config() if hasattr(ex, "text_config") else None,
                "codec": {"kind": self.codec_kind, "file": f}, "autoencoder": f,
                "autoencoder_report": self.fit_report,
                "online": {"warmup": self.warmup, "fitted_on_keyframes": self.fit_report.get("keyframes"),
                           "frozen": True, **self.ae}}

    def state(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        t: Dict[str, Tensor] = {}
        for i, rec in enumerate(self.raw):
            for li, f in enumerate(rec["feats"]):
                t[f"kf{i}.feat{li}"] = f.contiguous()
            if rec["index"] is not None:
                t[f"kf{i}.index"] = rec["index"].contiguous()
        cfg = {"keyframes": len(self.raw), "fitted": self.codec is not None, "fit_report": self.fit_report,
               "sizes": [list(rec.get("size", ())) for rec in self.raw]}
        return t, cfg

    def load_state(self, tensors: Dict[str, Tensor], cfg: Dict[str, Any]) -> None:
        from langfield.codec import codec_file, load_codec

        self.raw = []
        for i in range(int(cfg["keyframes"])):
            feats = [tensors[f"kf{i}.feat{li}"].clone() for li in range(len(self.levels))]
            rec: Dict[str, Any] = {"feats": feats, "index": tensors.get(f"kf{i}.index")}
            if rec["index"] is None:
                rec["size"] = tuple(cfg["sizes"][i])
            self.raw.append(rec)
        self.fit_report = dict(cfg.get("fit_report") or {})
        if cfg.get("fitted"):
            if self.run_dir is None:
                raise RunError("resuming online language needs the run folder's codec")
            path = self.run_dir / codec_file(self.codec_kind)
            if not path.is_file():
                raise RunError(f"{path}: missing; the run's language codec is needed to resume")
            self.codec = load_codec(path, self.codec_kind, device=self.device).eval()
            for p in self.codec.parameters():
                p.requires_grad_(False)
            self.targets = [self._encode(rec) for rec in self.raw]


def _frame_key(frame) -> int:
    """The scene frame number of a frame of a langfield scene's TUM/Replica copy (frame i has
    TUM time 1000 + i / 30, Replica name frameNNNNNN)."""
    name = str(frame.name)
    digits = "".join(c for c in Path(name).stem if c.isdigit())
    ts = float(frame.timestamp)
    if ts >= 1000.0 and abs((ts - 1000.0) * 30.0 - round((ts - 1000.0) * 30.0)) < 1e-3:
        return int(round((ts - 1000.0) * 30.0))
    return int(digits) if digits else int(frame.index)


def _scene_labels(seq) -> Tuple[Path, Dict[int, dict]]:
    """The scene folder and {frame number: label_paths} of a langfield scene's RGB-D copy."""
    if seq is None:
        raise RunError("--features labels needs a langfield scene (label maps and labels.json)")
    for root in (Path(seq.root), Path(seq.root).parent):
        tf = root / "transforms.json"
        if (root / "labels.json").is_file() and tf.is_file():
            try:
                doc = json.loads(tf.read_text("utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise RunError(f"{tf}: unreadable ({e})") from None
            out = {}
            for f in doc.get("frames", []):
                lp = f.get("label_paths")
                stem = Path(str(f.get("file_path", ""))).stem
                digits = "".join(c for c in stem if c.isdigit())
                if isinstance(lp, dict) and digits:
                    out[int(digits)] = lp
            if not out:
                raise RunError(f"{tf}: no frame has label_paths (labels needs `langfield scenes make` output)")
            return root, out
    raise RunError(f"{seq.root}: --features labels needs a langfield scene (labels.json and transforms.json with "
                   "label maps beside the RGB-D copy); use dense-clip or sam-clip on other data")
