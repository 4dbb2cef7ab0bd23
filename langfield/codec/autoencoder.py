"""Scene autoencoder: CLIP features (512-D) <-> low-dimensional language latents.

LangSplat's shape by default: an MLP encoder 512 -> 256 -> 128 -> 64 -> 32 -> 3 and a decoder
3 -> 16 -> 32 -> 64 -> 128 -> 256 -> 256 -> 512. The latent is what each Gaussian carries and
what the renderer rasterises; the decoder turns a rendered latent back into a CLIP-space feature
(L2-normalised) for text queries. All sizes are configuration (``in_dim``, ``encoder_dims``,
``latent_dim``, ``decoder_dims``), stored with the weights.

Fitting (:func:`fit_autoencoder`) takes the cached features of every image and every level at
once (one autoencoder per scene, shared by all levels, as LangSplat does), as one ``[M, D]``
tensor or an iterable of chunks ``[..., D]``:

* every vector is L2-normalised; zero, tiny (norm < 1e-6) and non-finite vectors are dropped
  (padding of "no mask" pixels in a feature cache);
* at most ``max_vectors`` vectors are kept: a uniform sample without replacement, drawn from the
  seeded generator chunk by chunk (each vector gets a random key; the ``max_vectors`` smallest
  keys are kept), so the whole cache never has to sit in memory at once. Pass per-mask features
  (SAM segments), not per-pixel maps, so that large segments do not dominate;
* a ``holdout`` fraction of the kept vectors is set aside and never trained on; the report's
  ``heldout_cos`` is the mean cosine between those vectors and their reconstructions;
* loss per vector: ``|x - x_hat|_1 + (1 - cos(x, x_hat))`` (mean over the batch), with
  ``x_hat`` the L2-normalised decoder output; Adam, cosine learning-rate decay to 1 % over
  ``steps``; minibatches drawn with replacement-free epochs from the seeded generator.

Same inputs, same seed, same device -> the same weights (CPU: bit for bit). The global torch
RNG is not touched: initialisation draws from a forked RNG state.

Files: ``save(path)`` writes ``<stem>.safetensors`` (weights) and ``<stem>.json`` (the
configuration and the fit report) atomically through :mod:`langfield.io.checkpoint`;
``SceneAutoencoder.load(path)`` reads them back (no pickle).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SceneAutoencoder", "AutoencoderConfig", "fit_autoencoder", "collect_features", "reconstruction_cosine",
           "autoencoder_loss"]

FORMAT = "langfield-autoencoder"
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class AutoencoderConfig:
    in_dim: int = 512
    encoder_dims: Tuple[int, ...] = (256, 128, 64, 32)
    latent_dim: int = 3
    decoder_dims: Tuple[int, ...] = (16, 32, 64, 128, 256, 256)
    # "batch" puts a BatchNorm1d before each hidden ReLU of the *encoder* (LangSplat does so);
    # "none" leaves it out. The decoder never normalises: it runs per pixel at query time and
    # must be a function of one latent alone.
    encoder_norm: str = "batch"

    def __post_init__(self):
        object.__setattr__(self, "encoder_dims", tuple(int(d) for d in self.encoder_dims))
        object.__setattr__(self, "decoder_dims", tuple(int(d) for d in self.decoder_dims))
        if self.in_dim < 1 or self.latent_dim < 1 or any(d < 1 for d in self.encoder_dims + self.decoder_dims):
            raise ValueError(f"autoencoder sizes must be positive: {self}")
        if self.encoder_norm not in ("batch", "none"):
            raise ValueError(f"encoder_norm must be 'batch' or 'none', not {self.encoder_norm!r}")


def _mlp(dims: Sequence[int], norm: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            if norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SceneAutoencoder(nn.Module):
    """``encode(x [..., in_dim]) -> z [..., latent_dim]`` (not normalised) and
    ``decode(z) -> x_hat [..., in_dim]`` (L2-normalised). ``decode_scores(z, emb)`` gives the
    cosines of the decoded features with a few embeddings without materialising the features'
    last layer (see there); the query functions use it."""

    def __init__(self, in_dim: int = 512, encoder_dims: Sequence[int] = (256, 128, 64, 32), latent_dim: int = 3,
                 decoder_dims: Sequence[int] = (16, 32, 64, 128, 256, 256), encoder_norm: str = "batch"):
        super().__init__()
        self.config = AutoencoderConfig(in_dim, tuple(encoder_dims), latent_dim, tuple(decoder_dims), encoder_norm)
        c = self.config
        self.encoder = _mlp((c.in_dim, *c.encoder_dims, c.latent_dim), norm=c.encoder_norm == "batch")
        self.decoder = _mlp((c.latent_dim, *c.decoder_dims, c.in_dim), norm=False)
        self.report: Dict[str, Any] = {}

    # -- shapes ---------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return self.config.in_dim

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: Tensor) -> Tensor:
        x = _check_last(x, self.in_dim, "encode")
        p = next(self.parameters())
        x = F.normalize(x.to(p.dtype), dim=-1)
        return self.encoder(x.reshape(-1, self.in_dim)).reshape(*x.shape[:-1], self.latent_dim)

    def decode_raw(self, z: Tensor) -> Tensor:
        """The decoder's output before normalisation."""
        z = _check_last(z, self.latent_dim, "decode")
        p = next(self.parameters())
        return self.decoder(z.to(p.dtype).reshape(-1, self.latent_dim)).reshape(*z.shape[:-1], self.in_dim)

    def decode(self, z: Tensor) -> Tensor:
        return F.normalize(self.decode_raw(z), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def decode_scores(self, z: Tensor, emb: Tensor) -> Tensor:
        """Cosines ``<decode(z), emb_k>`` for ``z [n, latent_dim]`` and ``emb [K, in_dim]``
        (rows L2-normalised by the caller) -> ``[n, K]``.

        The last layer ``y = h W^T + b`` (``W [in_dim, H]``) is folded into the scores:
        ``<y, e> = h (W^T e) + <b, e>`` and ``|y|^2 = h (W^T W) h^T + 2 h W^T b + |b|^2``, so
        per vector it costs ``H*H + H*K`` multiply-adds instead of ``H*in_dim + in_dim*K``
        (LangSplat's decoder: about 28 % of the decode work saved, and the [n, 512] features
        never exist). Equal to ``decode(z) @ emb.T`` up to float rounding (the norm is clamped
        at 1e-12 like ``F.normalize``)."""
        z = _check_last(z, self.latent_dim, "decode_scores")
        last = self.decoder[-1]
        p = last.weight
        z = z.to(p.dtype).reshape(-1, self.latent_dim)
        emb = emb.to(device=p.device, dtype=p.dtype)
        h = self.decoder[:-1](z)  # [n, H]
        W, b = last.weight, last.bias  # [D, H], [D]
        A = W.t() @ emb.t()  # [H, K]
        c = emb @ b  # [K]
        G = W.t() @ W  # [H, H]
        wb = 2.0 * (W.t() @ b)  # [H]
        dots = torch.addmm(c, h, A)  # [n, K]
        hG = h @ G
        nrm2 = (hG * h).sum(-1) + h @ wb + (b @ b)
        nrm = nrm2.clamp_min(0).sqrt().clamp_min(1e-12)
        return dots / nrm[:, None]

    # -- the language-codec interface (langfield.codec.base) ---------------------------------
    kind = "autoencoder"

    @property
    def target_dim(self) -> int:
        return self.latent_dim

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """2D supervision in latent space: the features' latents (LangSplat's targets)."""
        return self.encode(x)

    def loss(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """Masked L1 in latent space over the valid pixels of one level."""
        from langfield.codec.base import masked_l1_level

        return masked_l1_level(pred, target, valid)

    @classmethod
    def fit(cls, features, *, latent_dim: int = 3, seed: int = 0, device="auto", progress: bool = False,
            **options) -> Tuple["SceneAutoencoder", Dict[str, Any]]:
        """:func:`fit_autoencoder` as the codec interface's constructor."""
        return fit_autoencoder(features, latent_dim=latent_dim, seed=seed, device=device, progress=progress,
                               **options)

    # -- files -----------------------------------------------------------------------------
    def save(self, path: PathLike) -> str:
        """Write ``<stem>.safetensors`` + ``<stem>.json`` (config and fit report), atomically.
        ``path`` may name either file or the stem. Returns the ``.safetensors`` path."""
        from langfield.io.checkpoint import save_checkpoint

        tensors = {k.replace(".", "_"): v for k, v in self._flat_state().items()}
        cfg = {"format": FORMAT, "version": 1, "model": _cfg_json(self.config), "report": self.report,
               "keys": {k.replace(".", "_"): k for k in self._flat_state()}}
        return save_checkpoint(_stem_path(path), tensors, config=cfg, step=int(self.report.get("steps", 0)))

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "SceneAutoencoder":
        from langfield.io.checkpoint import CheckpointError, load_checkpoint

        ck = load_checkpoint(_stem_path(path), device=device)
        cfg = ck.config
        if cfg.get("format") != FORMAT:
            raise CheckpointError(f"{ck.path}: not a langfield autoencoder (format {cfg.get('format')!r})")
        m = cfg["model"]
        model = cls(m["in_dim"], m["encoder_dims"], m["latent_dim"], m["decoder_dims"], m.get("encoder_norm", "batch"))
        state = {cfg["keys"][k]: v for k, v in ck.tensors.items()}
        model.load_state_dict(state, strict=True)
        model.report = dict(cfg.get("report") or {})
        return model.to(device).eval()

    def _flat_state(self) -> Dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items()}


def _cfg_json(c: AutoencoderConfig) -> Dict[str, Any]:
    d = asdict(c)
    d["encoder_dims"] = list(c.encoder_dims)
    d["decoder_dims"] = list(c.decoder_dims)
    return d


def _stem_path(path: PathLike) -> str:
    p = os.fspath(path)
    if p.endswith(".safetensors") or p.endswith(".json"):
        return p
    return p + ".safetensors"


def _check_last(x: Tensor, d: int, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"{what}: expected [..., {d}], got {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------------
# data

def collect_features(features: Union[Tensor, Iterable[Tensor]], *, max_vectors: Optional[int] = 1_000_000,
                     seed: int = 0, dim: Optional[int] = None) -> Tensor:
    """Gather feature vectors into one float32 ``[M, D]`` tensor on the CPU: L2-normalised,
    with zero/tiny/non-finite vectors dropped, and at most ``max_vectors`` of them (a uniform
    sample without replacement, deterministic for a seed and a chunk order)."""
    if isinstance(features, Tensor):
        features = [features]
    g = torch.Generator().manual_seed(int(seed) + 0x5EED)
    kept: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    for chunk in features:
        chunk = torch.as_tensor(chunk)
        if chunk.ndim < 1:
            raise ValueError("features: each chunk must be [..., D]")
        if dim is None:
            dim = chunk.shape[-1]
        if chunk.shape[-1] != dim:
            raise ValueError(f"features: chunks disagree on the feature size ({chunk.shape[-1]} vs {dim})")
        x = chunk.detach().reshape(-1, dim).to("cpu", torch.float32)
        n = x.norm(dim=-1)
        ok = torch.isfinite(x).all(-1) & (n > 1e-6)
        x = x[ok] / n[ok, None]
        if not len(x):
            continue
        k = torch.rand(len(x), generator=g)
        if kept is None:
            kept, keys = x, k
        else:
            kept, keys = torch.cat([kept, x]), torch.cat([keys, k])
        if max_vectors is not None and len(kept) > max_vectors:
            sel = torch.topk(keys, int(max_vectors), largest=False).indices
            sel = sel.sort().values  # keep arrival order
            kept, keys = kept[sel], keys[sel]
    if kept is None:
        raise ValueError("features: no usable (finite, non-zero) feature vectors")
    return kept


def autoencoder_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over vectors of ``|x - x_hat|_1 + (1 - cos(x, x_hat))``."""
    l1 = (x - x_hat).abs().sum(-1)
    cos = F.cosine_similarity(x, x_hat, dim=-1)
    return (l1 + (1.0 - cos)).mean()


@torch.no_grad()
def reconstruction_cosine(model: SceneAutoencoder, x: Tensor, batch_size: int = 65536) -> float:
    """Mean cosine between ``x`` (rows normalised here) and ``model(x)`` in eval mode."""
    was = model.training
    model.eval()
    p = next(model.parameters())
    total, n = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = F.normalize(x[i:i + batch_size].to(p.device, p.dtype), dim=-1)
        total += F.cosine_similarity(xb, model(xb), dim=-1).double().sum().item()
        n += len(xb)
    model.train(was)
    return total / max(n, 1)


def _resolve_device(device) -> torch.device:
    from langfield.run import resolve_device

    return resolve_device(device, error=ValueError)


# ------------------------------------------------------------------------------------------
# fitting

def fit_autoencoder(features: Union[Tensor, Iterable[Tensor]], *, latent_dim: int = 3,
                    encoder_dims: Sequence[int] = (256, 128, 64, 32),
                    decoder_dims: Sequence[int] = (16, 32, 64, 128, 256, 256), encoder_norm: str = "batch",
                    steps: int = 5000, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                    holdout: float = 0.1, max_vectors: Optional[int] = 1_000_000, seed: int = 0,
                    device: Union[str, torch.device, None] = "auto", progress: Optional[bool] = False,
                    ) -> Tuple[SceneAutoencoder, Dict[str, Any]]:
    """Fit a :class:`SceneAutoencoder` to ``features`` (see the module docstring for the data
    handling). Returns ``(model in eval mode, report)`` with the report
    ``{"train_cos", "heldout_cos", "steps", "seconds", "n_train", "n_heldout", "final_loss",
    ...hyper-parameters}`` (``heldout_cos`` is None when nothing is held out); the report is
    also kept on ``model.report`` and saved with it.

    Defaults: 5000 Adam steps of 256 vectors at lr 1e-3 (cosine decay). On 20 synthetic
    clusters in 512-D, 1000 steps of 128 already reach the noise ceiling; the CPU cost is about
    20 ms per step of 256 on one core (LangSplat's sizes), so the default fit takes 1-2
    minutes on a CPU and seconds on a GPU. On a loaded machine one torch thread can be much
    faster than two for these small batches (``torch.set_num_threads``)."""
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    x = collect_features(features, max_vectors=max_vectors, seed=seed)
    M, D = x.shape
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(M, generator=g)
    n_hold = int(round(M * float(holdout))) if holdout > 0 and M > 1 else 0
    n_hold = min(max(n_hold, 1 if holdout > 0 and M > 1 else 0), M - 1)
    hold, train = x[perm[:n_hold]], x[perm[n_hold:]]
    if len(train) < 2:
        raise ValueError(f"fit_autoencoder: need at least 2 training vectors, have {len(train)}")
    train = train.to(dev)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = SceneAutoencoder(D, encoder_dims, latent_dim, decoder_dims, encoder_norm)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    bs = int(min(batch_size, len(train)))
    from langfield.train.progress import Progress, progress_mode

    bar = Progress(steps, desc="autoencoder", mode=progress_mode(progress))
    bar = bar if bar.active else None
    order = torch.randperm(len(train), generator=g)
    pos = 0
    loss_v = float("nan")
    ema = None
    for step in range(steps):
        if pos + bs > len(train):
            order = torch.randperm(len(train), generator=g)
            pos = 0
        idx = order[pos:pos + bs].to(dev)
        pos += bs
        xb = train[idx]
        x_hat = model.decode(model.encoder(xb))
        loss = autoencoder_loss(xb, x_hat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None or step == steps - 1:
            loss_v = loss.item()
            ema = loss_v if ema is None else 0.98 * ema + 0.02 * loss_v
        if bar is not None:
            if step % 50 == 0 or step == steps - 1:
                bar.set(loss=ema, lr=f"{sched.get_last_lr()[0]:.2e}")
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    train_eval = train[: min(len(train), 200_000)]
    report: Dict[str, Any] = {
        "train_cos": reconstruction_cosine(model, train_eval),
        "heldout_cos": reconstruction_cosine(model, hold.to(dev)) if n_hold else None,
        "steps": int(steps), "seconds": time.perf_counter() - t0, "n_train": int(len(train)),
        "n_heldout": int(n_hold), "final_loss": loss_v, "batch_size": bs, "lr": lr, "seed": int(seed),
        "latent_dim": int(latent_dim), "device": str(dev),
    }
    model.report = report
    return model, report
