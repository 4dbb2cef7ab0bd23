"""Feature extractors end to end with tiny randomly initialised open_clip and SAM models
(no weights, no network), the cache, mask NMS against a brute-force reference, the labels
extractor on a procedural scene, and the missing-weights errors."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
segment_anything = pytest.importorskip("segment_anything")

from langfield.features import (LEVELS, CacheMismatchError, FeatureCache, FeatureMaps, FrameInfo, LevelMaps,  # noqa: E402
                                OfflineTextEncoder, WeightsUnavailableError, extract_dataset, mask_nms)
from langfield.features.dense_clip import DenseClipExtractor, DenseClipParams, maskclip_tokens, window_starts  # noqa: E402
from langfield.features.labels import LabelsExtractor, LabelsParams  # noqa: E402
from langfield.features.models import load_clip, load_sam  # noqa: E402
from langfield.features.sam_clip import (SamClipExtractor, SamClipParams, crop_regions,  # noqa: E402
                                         index_map_smallest_first)

TINY_CLIP = "langfield-test-tiny-vit"


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 2-layer ViT (width 64, patch 16, input 64) + 2-layer text tower, embed dim 32,
    registered as an open_clip model config and built with random weights."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    d = tmp_path_factory.mktemp("clipcfg")
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    clip = load_clip(TINY_CLIP, device="cpu", random_init=True)
    assert clip.dim == 32 and clip.image_size == (64, 64) and clip.random_init
    return clip


def tiny_sam(img_size: int = 64):
    """A SAM with the real architecture at toy size: ViT encoder (1 block, width 32, patch 16),
    prompt encoder and two-way mask decoder of width 32. SamPredictor resizes the longest
    image side to ``img_size``."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(1)
    e = 32
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                      out_chans=e, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True),
        prompt_encoder=PromptEncoder(embed_dim=e, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=e, mlp_dim=64, num_heads=2),
                                 transformer_dim=e, iou_head_depth=1, iou_head_hidden_dim=32),
    )
    return sam.eval()


def loose_params(**kw):
    """Random SAM weights give random IoU predictions: accept every mask."""
    base = dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=-1e9, stability_score_thresh=-1.0,
                min_mask_area=1, nms_score_thresh=-1e9, clip_batch=8)
    base.update(kw)
    return SamClipParams(**base)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from langfield.scenes import make_scene

    out = tmp_path_factory.mktemp("scene") / "tabletop"
    make_scene("tabletop", out, views=3, size=(48, 40), aa=1, workers=1)
    return out


@pytest.fixture(scope="module")
def dataset(scene):
    from langfield.data import load_dataset

    return load_dataset(scene)


def _check_regions(fm: FeatureMaps, H: int, W: int, dim: int):
    assert fm.kind == "regions" and fm.image_size == (H, W) and list(fm.levels) == list(LEVELS)
    for level, lv in fm.levels.items():
        assert lv.features.dtype == torch.float16 and lv.features.ndim == 2 and lv.features.shape[1] == dim
        assert lv.index.dtype == torch.int32 and tuple(lv.index.shape) == (H, W)
        R = lv.features.shape[0]
        assert int(lv.index.min()) >= -1 and int(lv.index.max()) < R
        if R:
            assert torch.allclose(lv.features.float().norm(dim=-1), torch.ones(R), atol=2e-3)
            # every region owns at least one pixel
            assert torch.equal(torch.unique(lv.index[lv.index >= 0]), torch.arange(R, dtype=torch.int32))


# ----------------------------------------------------------------------------------- NMS
def brute_force_nms(masks, scores, iou_thresh, score_thresh, contain_thresh=None, contain_ratio=0.5):
    """The rule of langfield.features.nms, written as plain Python loops over pairs."""
    M = len(masks)
    m = [masks[i].flatten().tolist() for i in range(M)]
    area = [sum(x) for x in m]

    def inter(i, j):
        return sum(a and b for a, b in zip(m[i], m[j]))

    cand = [i for i in range(M) if float(scores[i]) > score_thresh]
    alive = set(cand)
    if contain_thresh is not None:
        for j in cand:
            for i in cand:
                if i != j and area[j] > 0:
                    n = inter(i, j)
                    if n >= contain_thresh * area[j] and n < contain_ratio * area[i]:
                        alive.discard(j)
                        break
    order = sorted(cand, key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in order:
        if i not in alive:
            continue
        ok = True
        for k in kept:
            n = inter(i, k)
            u = area[i] + area[k] - n
            if u > 0 and n / u > iou_thresh:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


@pytest.mark.parametrize("contain", [None, 0.85])
def test_mask_nms_matches_brute_force(contain):
    g = torch.Generator().manual_seed(3)
    H = W = 20
    masks = []
    for _ in range(30):  # random rectangles, some near-duplicates, some nested
        y0, x0 = torch.randint(0, H - 2, (2,), generator=g).tolist()
        h, w = torch.randint(1, H, (2,), generator=g).tolist()
        m = torch.zeros(H, W, dtype=torch.bool)
        m[y0:y0 + h, x0:x0 + w] = True
        masks.append(m)
    masks += [masks[0].clone(), masks[3] | masks[4], torch.zeros(H, W, dtype=torch.bool)]
    masks = torch.stack(masks)
    scores = torch.rand(len(masks), generator=g)
    scores[5] = scores[6]  # a tie
    for iou_t, score_t in ((0.5, 0.0), (0.8, 0.3), (0.2, 0.1)):
        got = mask_nms(masks, scores, iou_t, score_t, contain, 0.5).tolist()
        ref = brute_force_nms(masks, scores, iou_t, score_t, contain, 0.5)
        assert got == ref
    assert mask_nms(masks[:0], scores[:0]).numel() == 0


def test_index_map_smallest_first_and_crops():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0] = True  # whole image
    masks[1, 2:6, 2:8] = True
    masks[2, 3:4, 3:4] = True  # inside 1
    idx, used = index_map_smallest_first(masks)
    assert used.tolist() == [0, 1, 2]
    assert idx[0, 0] == 0 and idx[2, 2] == 1 and idx[3, 3] == 2
    # a mask covered entirely by smaller ones is dropped and the map renumbered
    m2 = torch.stack([masks[1], masks[2], masks[2].clone()])
    idx2, used2 = index_map_smallest_first(m2)
    assert used2.tolist() == [0, 1] and int(idx2.max()) == 1 and idx2[3, 3] == 1 and idx2[0, 0] == -1
    img = torch.rand(3, 8, 10)
    crops = crop_regions(img, masks, (16, 16))
    assert crops.shape == (3, 3, 16, 16) and float(crops.min()) >= 0 and float(crops.max()) <= 1


# ------------------------------------------------------------------------------ sam-clip
def test_sam_clip_end_to_end(tiny_clip, dataset, tmp_path):
    ex = SamClipExtractor(tiny_sam(64), tiny_clip, loose_params())
    img = dataset.load_image(0)
    H, W = img.shape[:2]
    fm = ex.extract(img, FrameInfo.from_dataset(dataset, 0))
    _check_regions(fm, H, W, 32)
    assert sum(fm.levels[lv].num_regions for lv in LEVELS) > 0
    # the features are CLIP embeddings of the masked crops
    lv = next(lv for lv in LEVELS if fm.levels[lv].num_regions)
    masks = ex.masks(img)[lv][0]
    _, used = index_map_smallest_first(masks)
    crops = crop_regions(img.permute(2, 0, 1), masks[used], tiny_clip.image_size)
    ref = tiny_clip.encode_image(crops)
    assert torch.allclose(fm.levels[lv].features.float(), ref, atol=2e-3)
    cfg = ex.config()
    assert cfg["clip"]["model"] == TINY_CLIP and cfg["clip"]["random_init"] and cfg["sam"]["img_size"] == 64
    # per-pixel features of a region level
    d = fm.dense(lv)
    assert d.shape == (H, W, 32)


class Counting:
    """Wraps an extractor and counts the images it is asked to process."""

    def __init__(self, ex):
        self.ex, self.calls = ex, 0
        for k in ("name", "kind", "levels", "dim"):
            setattr(self, k, getattr(ex, k))
        self.needs_image = getattr(ex, "needs_image", True)

    def extract_batch(self, images, infos):
        self.calls += len(images)
        return self.ex.extract_batch(images, infos)

    def config(self):
        return self.ex.config()

    def text_config(self):
        return self.ex.text_config()


def test_cache_resume_and_roundtrip(tiny_clip, dataset, tmp_path):
    ex = Counting(SamClipExtractor(tiny_sam(64), tiny_clip, loose_params(points_per_side=4)))
    cache_dir = tmp_path / "features"
    cache = extract_dataset(dataset, ex, cache_dir, batch_size=2, progress=False, indices=[0, 1], log=lambda *a: None)
    assert ex.calls == 2 and len(cache) == 2
    name0 = dataset.frames[0].name
    first = cache.load(name0)
    # rerun over all images: the two finished ones are skipped
    cache = extract_dataset(dataset, ex, cache_dir, batch_size=2, progress=False, log=lambda *a: None)
    assert ex.calls == 3 and len(cache) == len(dataset)
    assert all(cache.has(f.name) for f in dataset.frames)
    again = FeatureCache(cache_dir).load(name0)
    for lv in LEVELS:
        assert torch.equal(first.levels[lv].features, again.levels[lv].features)
        assert torch.equal(first.levels[lv].index, again.levels[lv].index)
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["extractor"] == "sam-clip" and m["levels"] == list(LEVELS) and m["dim"] == 32
    assert m["config"]["clip"]["model"] == TINY_CLIP and m["text"]["type"] == "clip"
    # a different configuration is refused, or replaces the cache with overwrite=True
    other = SamClipExtractor(tiny_sam(64), tiny_clip, loose_params(points_per_side=5))
    with pytest.raises(CacheMismatchError, match="points_per_side"):
        extract_dataset(dataset, other, cache_dir, progress=False, log=lambda *a: None)
    cache = extract_dataset(dataset, other, cache_dir, progress=False, indices=[0], overwrite=True,
                            log=lambda *a: None)
    assert len(cache) == 1
    # the recorded text encoder is the extractor's CLIP
    assert cache.text_encoder(clip=tiny_clip).clip is tiny_clip


# ---------------------------------------------------------------------------- dense-clip
def test_maskclip_uses_the_value_path_only(tiny_clip):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = maskclip_tokens(tiny_clip, x)
    assert t.shape == (2, 4, 4, 32)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2, 4, 4), atol=1e-5)
    attn = tiny_clip.model.visual.transformer.resblocks[-1].attn
    E = attn.embed_dim
    saved = attn.in_proj_weight.detach().clone()
    try:
        with torch.no_grad():
            attn.in_proj_weight[:2 * E] += torch.randn(2 * E, E)  # queries and keys: no effect
        assert torch.allclose(maskclip_tokens(tiny_clip, x), t, atol=1e-5)
        with torch.no_grad():
            attn.in_proj_weight[2 * E:] += torch.randn(E, E)  # values: change the result
        assert not torch.allclose(maskclip_tokens(tiny_clip, x), t, atol=1e-3)
    finally:
        with torch.no_grad():
            attn.in_proj_weight.copy_(saved)


def test_dense_clip_windows(tiny_clip):
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(128, 64, 32) == [0, 32, 64]
    assert window_starts(100, 64, 48) == [0, 36]
    g = torch.Generator().manual_seed(1)
    # an image that fits one window: identical to one forward pass
    ex = DenseClipExtractor(tiny_clip, DenseClipParams(short_side=64))
    img = torch.rand(64, 64, 3, generator=g)
    fm = ex.extract(img)
    assert fm.kind == "dense" and fm.image_size == (64, 64) and fm.meta["windows"] == 1
    ref = maskclip_tokens(tiny_clip, img.permute(2, 0, 1)[None])[0]
    assert torch.allclose(fm.levels["dense"].features.float(), ref, atol=2e-3)
    # a wide image: 3 overlapping windows; columns seen by the first window only match it
    wide = torch.rand(64, 128, 3, generator=g)
    fm2 = ex.extract(wide)
    assert fm2.levels["dense"].features.shape == (4, 8, 32) and fm2.meta["windows"] == 3
    w0 = maskclip_tokens(tiny_clip, wide.permute(2, 0, 1)[None, :, :, :64])[0]
    assert torch.allclose(fm2.levels["dense"].features.float()[:, :2], w0[:, :2], atol=2e-3)
    w2 = maskclip_tokens(tiny_clip, wide.permute(2, 0, 1)[None, :, :, 64:])[0]
    assert torch.allclose(fm2.levels["dense"].features.float()[:, 6:], w2[:, 2:], atol=2e-3)
    # batching over images gives the same result as one at a time
    b = ex.extract_batch([img, wide], [None, None])
    assert torch.equal(b[0].levels["dense"].features, fm.levels["dense"].features)
    assert torch.equal(b[1].levels["dense"].features, fm2.levels["dense"].features)
    # resized working resolution and per-pixel interpolation
    ex2 = DenseClipExtractor(tiny_clip, DenseClipParams(short_side=96))
    fm3 = ex2.extract(torch.rand(40, 50, 3, generator=g))
    assert fm3.levels["dense"].features.shape == (6, 8, 32) and fm3.image_size == (40, 50)
    assert fm3.dense("dense").shape == (40, 50, 32)


def test_dense_clip_dataset(tiny_clip, dataset, tmp_path):
    ex = DenseClipExtractor(tiny_clip, DenseClipParams(short_side=64))
    cache = extract_dataset(dataset, ex, tmp_path / "f", batch_size=3, progress=False, log=lambda *a: None)
    fm = cache.load(dataset.frames[2].name)
    H, W = dataset.load_image(2).shape[:2]
    assert fm.kind == "dense" and fm.image_size == (H, W) and fm.levels["dense"].index is None
    assert cache.levels == ["dense"] and cache.kind == "dense"


# -------------------------------------------------------------------------------- labels
def test_labels_extractor_exact(scene, dataset, tmp_path):
    from langfield.data import read_image

    enc = OfflineTextEncoder(dim=64)
    ex = LabelsExtractor(enc)
    logs = []
    cache = extract_dataset(dataset, ex, tmp_path / "features", progress=False, log=logs.append)
    assert any("offline text encoder" in s for s in logs)
    m = json.loads((tmp_path / "features" / "manifest.json").read_text())
    assert m["text"]["type"] == "offline" and "not CLIP" in m["text"]["note"]
    names = json.loads((scene / "labels.json").read_text())["names"]
    for i, f in enumerate(dataset.frames):
        fm = cache.load(f.name)
        for level in LEVELS:
            lab = torch.from_numpy(read_image(scene / f.extras["label_paths"][level]).astype(np.int64))
            ids = [int(v) for v in torch.unique(lab) if v != 0]
            idx = fm.levels[level].index.long()
            assert torch.equal(idx == -1, lab == 0)
            for r, k in enumerate(ids):
                assert torch.equal(idx == r, lab == k)
            texts = [names[level][str(k)] for k in ids]
            assert torch.allclose(fm.levels[level].features.float(), enc.encode(texts), atol=2e-3)
    # the recorded text encoder is rebuilt for queries
    again = cache.text_encoder()
    assert isinstance(again, OfflineTextEncoder) and torch.equal(again.encode(["red mug"]), enc.encode(["red mug"]))


def test_labels_perturbations(dataset):
    enc = OfflineTextEncoder(dim=64)
    info = FrameInfo.from_dataset(dataset, 0)
    exact = LabelsExtractor(enc).extract(None, info)
    noisy = LabelsExtractor(enc, LabelsParams(noise=0.3, drop=0.3, merge=0.3, seed=1))
    a = noisy.extract(None, info)
    b = noisy.extract(None, info)
    for level in LEVELS:  # deterministic per view
        assert torch.equal(a.levels[level].index, b.levels[level].index)
        assert torch.equal(a.levels[level].features, b.levels[level].features)
    _check_regions(a, *exact.image_size, 64)
    assert sum(a.levels[lv].num_regions for lv in LEVELS) < sum(exact.levels[lv].num_regions for lv in LEVELS)
    # another view gets other perturbations
    c = noisy.extract(None, FrameInfo.from_dataset(dataset, 1))
    assert c.image_size == a.image_size


def test_offline_text_encoder():
    enc = OfflineTextEncoder(dim=128, seed=0)
    e = enc.encode(["red mug", "Red  mug", "blue mug", "banana", "red mug"])
    assert e.shape == (5, 128) and torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(e[0], e[4]) and torch.allclose(e[0], e[1])  # case and spacing do not matter
    assert float(e[0] @ e[2]) > float(e[0] @ e[3]) + 0.03  # shared words correlate
    assert 0.6 < float(e[2] @ e[3]) < 0.8  # CLIP-like: all texts in a cone (cosine ~0.7)
    f = enc.encode(["handle of the red mug", "handle of the blue mug", "handle of red mug"])
    assert torch.allclose(f[0] @ f[2], torch.tensor(0.7 + 0.3 * 3 / 7), atol=0.06)  # stop words do not count
    assert float(f[0] @ f[1]) < float(f[0] @ f[2])
    assert not torch.equal(OfflineTextEncoder(dim=128, seed=1).encode(["red mug"])[0], e[0])


# ----------------------------------------------------------------------- missing weights
def test_missing_clip_weights_messages(monkeypatch, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="ViT-B-16.*not found.*--clip-checkpoint"):
        load_clip("ViT-B-16", "laion2b_s34b_b88k", checkpoint=tmp_path / "nope.bin", device="cpu")

    def offline(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b88k': Failed to download file "
                           "(open_clip_pytorch_model.bin). Last error: cannot reach huggingface.co")

    from langfield.features import models

    # no cached copy and no network: fails at once, without a download attempt
    monkeypatch.setattr(models, "clip_weights_cached", lambda *a: False)
    monkeypatch.setattr(models, "hub_reachable", lambda *a: False)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(WeightsUnavailableError, match="ViT-B-16/laion2b_s34b_b88k .*not available offline .*"
                                                      "unreachable.*--clip-checkpoint PATH"):
        load_clip("ViT-B-16", "laion2b_s34b_b88k", device="cpu")
    # the download itself fails
    monkeypatch.setattr(models, "hub_reachable", lambda *a: True)
    with pytest.raises(WeightsUnavailableError) as e:
        load_clip("ViT-B-16", "laion2b_s34b_b88k", device="cpu")
    msg = str(e.value)
    assert "ViT-B-16/laion2b_s34b_b88k" in msg and "not available offline" in msg
    assert "--clip-checkpoint PATH" in msg and "HF_HUB_OFFLINE" in msg and "cannot reach huggingface.co" in msg
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for ViT-B-16"):
        load_clip("ViT-B-16", "nope", device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("ViT-Q-99", "x", device="cpu")


def test_bad_checkpoint_file(tiny_clip, tmp_path):
    from langfield.features import WeightsError

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=f"cannot load .*bad.bin as open_clip {TINY_CLIP}"):
        load_clip(TINY_CLIP, checkpoint=bad, device="cpu")


def test_missing_sam_weights_messages(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"SAM weights \(vit_h\).*sam_vit_h_4b8939.pth.*--sam-checkpoint"):
        load_sam("vit_h", None, device="cpu")
    with pytest.raises(WeightsUnavailableError, match=r"SAM checkpoint \(vit_b\) not found.*nope.pth"):
        load_sam("vit_b", tmp_path / "nope.pth", device="cpu")
    with pytest.raises(ValueError, match="unknown SAM model"):
        load_sam("vit_x", None)


def test_text_encoder_auto_falls_back_offline(monkeypatch):
    from langfield.features import factory

    monkeypatch.setattr(factory, "clip_weights_cached", lambda *a: False)
    logs = []
    enc = factory.make_text_encoder("auto", log=logs.append)
    assert isinstance(enc, OfflineTextEncoder) and enc.dim == 512
    assert "not available here" in logs[0] and "offline text encoder" in logs[0]
    ex = factory.make_extractor("labels", text_encoder="offline", device="cpu")
    assert ex.config()["text"]["type"] == "offline"


def test_feature_maps_dense_gather():
    feats = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1).half()
    idx = torch.tensor([[0, 1], [-1, 1]], dtype=torch.int32)
    fm = FeatureMaps({"part": LevelMaps(feats, idx)}, (2, 2))
    d = fm.dense("part")
    assert torch.equal(d[0, 0], feats[0].float()) and torch.equal(d[1, 0], torch.zeros(4))
    assert fm.valid("part").tolist() == [[True, True], [False, True]]
    assert fm.dense("part", size=(4, 4)).shape == (4, 4, 4)
