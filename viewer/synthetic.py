"""A small language field built in memory, for tests, benchmarks and trying the viewer
without a trained run: labelled blobs of Gaussians whose latents decode exactly to their
label's text embedding.

``blob_field()`` -> a :class:`~langfield.field.LanguageField` with three objects ("red mug",
"green ball", "blue box") in a row along x, an offline (hashed) text encoder, a linear
decoder (latent = one-hot object index; decodes to the object's embedding), three levels
that share the latents, and a ring of dataset cameras looking at the objects (OpenCV world:
y down, the first camera on -z looking along +z).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["blob_field", "LinearDecoder", "ring_cameras", "OBJECTS"]

OBJECTS: Tuple[Tuple[str, Tuple[float, float, float], Tuple[float, float, float]], ...] = (
    ("red mug", (-0.8, 0.0, 0.0), (0.85, 0.15, 0.15)),
    ("green ball", (0.0, 0.0, 0.0), (0.2, 0.8, 0.25)),
    ("blue box", (0.8, 0.0, 0.0), (0.2, 0.3, 0.9)),
)


class LinearDecoder(torch.nn.Module):
    """``decode(z) = normalise(z @ E)``: a one-hot latent decodes to row ``k`` of ``E``."""

    def __init__(self, emb: torch.Tensor):
        super().__init__()
        self.register_buffer("E", F.normalize(emb.float(), dim=-1))

    @property
    def latent_dim(self) -> int:
        return int(self.E.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z.float() @ self.E.to(z.device), dim=-1)


def ring_cameras(n: int = 8, *, radius: float = 3.0, height: float = -0.6, width: int = 128, image_height: int = 96,
                 focal: Optional[float] = None, center=(0.0, 0.0, 0.0)):
    """``n`` :class:`~langfield.field.FieldCamera` on a ring around ``center`` (OpenCV world,
    y down: ``height`` < 0 is above), all looking at it; camera 0 sits on -z."""
    from langfield.field import FieldCamera

    c = np.asarray(center, dtype=np.float64)
    f = focal if focal is not None else 1.1 * width
    K = np.array([[f, 0, width / 2], [0, f, image_height / 2], [0, 0, 1.0]])
    cams = []
    for i in range(n):
        a = 2 * math.pi * i / n
        pos = c + np.array([radius * math.sin(a), height, -radius * math.cos(a)])
        z = c - pos
        z /= np.linalg.norm(z)
        x = np.cross(np.array([0.0, -1.0, 0.0]), z)  # right = up x forward (y down)
        x = -x / np.linalg.norm(x)
        y = np.cross(z, x)
        R = np.stack([x, y, z], 1)  # camera-to-world rotation (columns: x right, y down, z forward)
        vm = np.eye(4)
        vm[:3, :3] = R.T
        vm[:3, 3] = -R.T @ pos
        cams.append(FieldCamera(f"ring_{i:02d}", vm, K.copy(), width, image_height,
                                "test" if i % 4 == 3 else "train", i))
    return cams


def blob_field(n_per_object: int = 400, *, objects=OBJECTS, colors: Optional[Sequence[Sequence[float]]] = None,
               blob_radius: float = 0.25, scale: float = 0.05, n_background: int = 0,
               levels=("subpart", "part", "whole"), decoder: str = "linear", text_dim: int = 64, n_cameras: int = 8,
               seed: int = 0, device="cpu"):
    """See the module docstring. ``colors`` overrides the objects' colours (e.g. all grey, so
    that a heatmap is the only difference between them); ``n_background`` adds Gaussians
    without meaning (zero latents) scattered around the objects; ``decoder="mlp"`` uses a
    randomly initialised :class:`~langfield.autoencoder.SceneAutoencoder` of LangSplat's shape
    instead of the linear decoder (for timing: its relevancy means nothing); ``decoder="codebook"``
    a :class:`~langfield.codec.codebook.CodebookCodec` whose entries are the objects' embeddings
    (the same one-hot latents, now sparse coefficients: the fused sparse query path)."""
    from langfield.features.text import OfflineTextEncoder
    from langfield.field import LanguageField
    from langfield.scene import Gaussians, rgb_to_sh

    gen = torch.Generator().manual_seed(seed)
    n_obj = len(objects)
    means, cols, lat = [], [], []
    for k, (name, c, rgb) in enumerate(objects):
        d = torch.randn(n_per_object, 3, generator=gen)
        r = blob_radius * torch.rand(n_per_object, 1, generator=gen) ** (1 / 3)
        means.append(torch.tensor(c, dtype=torch.float32) + F.normalize(d, dim=-1) * r)
        col = colors[k] if colors is not None else rgb
        cols.append(torch.tensor(col, dtype=torch.float32).expand(n_per_object, 3))
        z = torch.zeros(n_per_object, n_obj)
        z[:, k] = 1.0
        lat.append(z)
    if n_background:
        means.append((torch.rand(n_background, 3, generator=gen) - 0.5) * torch.tensor([3.0, 1.5, 3.0]))
        cols.append(torch.rand(n_background, 3, generator=gen) * 0.5 + 0.25)
        lat.append(torch.zeros(n_background, n_obj))
    means = torch.cat(means)
    N = means.shape[0]
    rgb = torch.cat(cols)
    z = torch.cat(lat)
    te = OfflineTextEncoder(dim=text_dim)
    emb = te.encode([o[0] for o in objects])
    if decoder == "linear":
        dec = LinearDecoder(emb)
        L = n_obj
    elif decoder == "mlp":
        from langfield.autoencoder import SceneAutoencoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dec = SceneAutoencoder(in_dim=text_dim, latent_dim=3).eval()
        L = 3
        z = torch.randn(N, 3, generator=gen)
    elif decoder == "codebook":
        from langfield.codec.codebook import CodebookCodec

        dec = CodebookCodec(emb, topk=1).eval()  # one entry per object; latents one-hot (1-sparse, on the simplex)
        L = n_obj
    else:
        raise ValueError(f"decoder must be 'linear', 'mlp' or 'codebook', got {decoder!r}")
    lang = z.repeat(1, len(levels))
    quats = torch.zeros(N, 4)
    quats[:, 0] = 1
    g = Gaussians(means, quats, torch.full((N, 3), math.log(scale)), torch.full((N,), 2.2), rgb_to_sh(rgb)[:, None, :],
                  lang=lang, requires_grad=False).to(device)
    dec = dec.to(device)
    return LanguageField(g, decoder=dec, text_encoder=te, levels=list(levels), latent_dim=L,
                         cameras=ring_cameras(n_cameras), source=None, kind="memory", stage="language")
