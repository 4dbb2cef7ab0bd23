"""Image metrics of a scene on a dataset's views: render, composite the ground truth the same
way, PSNR / SSIM per view, and optionally the renders on disk. Used by the RGB stage at its end,
``langfield eval`` and ``langfield render``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from langfield.render.model import Cameras, render

__all__ = ["evaluate_views", "render_views", "composite_on", "eval_background"]

PathLike = Union[str, os.PathLike]


def composite_on(image: Tensor, alpha: Optional[Tensor], bg: Tensor) -> Tensor:
    """The dataset composites RGBA on white; recomposite on ``bg`` (exact: premultiplied)."""
    if alpha is None:
        return image
    return image + (bg - 1.0) * (1.0 - alpha)


def eval_background(resolved_bg: str) -> Tuple[float, float, float]:
    return (0.0, 0.0, 0.0) if resolved_bg == "black" else (1.0, 1.0, 1.0)


def _safe_name(name: str, index: int) -> str:
    stem = Path(name).stem if name else "view"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "view"
    return f"{index:04d}_{stem}"


@torch.no_grad()
def evaluate_views(gaussians, dataset, indices: Sequence[int], *, background=(1.0, 1.0, 1.0),
                   sh_degree: Optional[int] = None, backend: str = "auto", out_dir: Optional[PathLike] = None,
                   progress: bool = False) -> Dict[str, Any]:
    """Render the frames ``indices`` of ``dataset``, compare with their images (RGBA composited
    on ``background``): ``{"psnr", "ssim", "views": [{"index", "name", "psnr", "ssim"}]}``.
    With ``out_dir``, writes ``<NNNN_name>.png`` (prediction) and ``<NNNN_name>_gt_pred.png``
    (ground truth | prediction) there."""
    from langfield.eval.metrics import psnr, ssim

    dev = gaussians.device
    bg = torch.tensor(background, dtype=torch.float32, device=dev)
    deg = gaussians.sh_degree if sh_degree is None else sh_degree
    views = []
    it = indices
    if progress:
        from tqdm import tqdm

        it = tqdm(indices, desc="eval", unit="view", leave=False)
    for i in it:
        f = dataset.frames[i]
        image, alpha = dataset._cached_rgba(i)
        gt = composite_on(image, alpha, bg.cpu()).to(dev)
        pred = render(gaussians, Cameras.from_frame(f, dev), sh_degree=deg, background=bg,
                      backend=backend).rgb[0].clamp(0, 1)
        views.append({"index": int(i), "name": f.name, "psnr": float(psnr(pred, gt)), "ssim": float(ssim(pred, gt))})
        if out_dir is not None:
            _save_pair(Path(out_dir), _safe_name(f.name, i), pred, gt)
    out: Dict[str, Any] = {"views": views, "n_views": len(views)}
    out["psnr"] = float(np.mean([v["psnr"] for v in views])) if views else None
    out["ssim"] = float(np.mean([v["ssim"] for v in views])) if views else None
    return out


def _to_u8(x: Tensor) -> np.ndarray:
    return (x.detach().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def _save_pair(folder: Path, stem: str, pred: Tensor, gt: Optional[Tensor]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_u8(pred)).save(folder / f"{stem}.png")
    if gt is not None:
        Image.fromarray(np.concatenate([_to_u8(gt), _to_u8(pred)], axis=1)).save(folder / f"{stem}_gt_pred.png")


@torch.no_grad()
def render_views(gaussians, dataset, indices: Sequence[int], out_dir: PathLike, *, background=(1.0, 1.0, 1.0),
                 backend: str = "auto", progress: bool = False) -> List[Path]:
    """Render frames to ``out_dir`` (prediction + side by side with the ground truth)."""
    evaluate_views(gaussians, dataset, indices, background=background, backend=backend, out_dir=out_dir,
                   progress=progress)
    return [Path(out_dir) / f"{_safe_name(dataset.frames[i].name, i)}.png" for i in indices]


