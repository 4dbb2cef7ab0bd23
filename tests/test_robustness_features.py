"""Feature cache integrity (#12.10), the extractor factory's home (#11.3) and SAM weights
loaded without unpickling (#11.7)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from types import SimpleNamespace

import pytest
import torch

from langfield.features import CacheCorruptError, FeatureCache, FeatureMaps, LevelMaps, extract_dataset

LEVELS = ("subpart", "part", "whole")


def _fm(name: str) -> FeatureMaps:
    """Deterministic features of one image (a function of its name)."""
    g = torch.Generator().manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
    return FeatureMaps({lv: LevelMaps(torch.randn(4, 5, 8, generator=g).half()) for lv in LEVELS}, (16, 20), "dense")


class FakeExtractor:
    name, kind, levels, dim, needs_image = "fake", "dense", LEVELS, 8, False

    def __init__(self):
        self.done = []

    def extract_batch(self, images, infos):
        self.done += [i.name for i in infos]
        return [_fm(i.name) for i in infos]

    def config(self):
        return {"fake": 1}

    def text_config(self):
        return {"type": "clip", "model": "fake"}


class DS:
    def __init__(self, n=4):
        self.frames = [SimpleNamespace(name=f"img_{i:02d}.png") for i in range(n)]

    def __len__(self):
        return len(self.frames)

    def load_image(self, i):
        return None


def _extract(ds, folder, ex=None, logs=None):
    ex = ex or FakeExtractor()
    cache = extract_dataset(ds, ex, folder, progress=False, log=(logs.append if logs is not None else lambda m: None))
    return cache, ex


def _same(a: FeatureMaps, b: FeatureMaps) -> bool:
    return all(torch.equal(a.levels[lv].features, b.levels[lv].features) for lv in LEVELS)


def test_manifest_records_size_and_digest(tmp_path):
    ds = DS(3)
    cache, ex = _extract(ds, tmp_path / "f")
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    for name, e in m["images"].items():
        data = (tmp_path / "f" / e["file"]).read_bytes()
        assert e["bytes"] == len(data) and e["blake2b"] == hashlib.blake2b(data, digest_size=32).hexdigest()
    assert cache.verify() == {} and ex.done == [f.name for f in ds.frames]
    assert not list((tmp_path / "f").glob("*.tmp"))


def test_truncated_entry_is_recomputed_with_a_warning(tmp_path):
    ds = DS(4)
    cache, _ = _extract(ds, tmp_path / "f")
    name = ds.frames[2].name
    path = cache.path(name)
    path.write_bytes(path.read_bytes()[:40])
    assert not FeatureCache(tmp_path / "f").has(name)  # size checked on use, always
    with pytest.raises(CacheCorruptError, match=rf"{path.name}: damaged feature cache entry of '{name}'"):
        FeatureCache(tmp_path / "f").load(name)
    logs = []
    cache, ex = _extract(ds, tmp_path / "f", logs=logs)
    assert ex.done == [name]  # only the damaged one
    assert any("warning" in m and path.name in m and "recomputing" in m for m in logs), logs
    assert _same(cache.load(name), _fm(name)) and cache.verify() == {}


def test_same_size_damage_is_found_by_the_checksum(tmp_path):
    ds = DS(3)
    cache, _ = _extract(ds, tmp_path / "f")
    name = ds.frames[0].name
    path = cache.path(name)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path / "f")
    assert fresh.has(name)  # the cheap check cannot see it ...
    assert list(fresh.verify()) == [name] and "checksum" in fresh.verify()[name]  # ... the digest does
    with pytest.raises(CacheCorruptError, match="contents differ from the checksum"):
        fresh.load(name)
    logs = []
    cache, ex = _extract(ds, tmp_path / "f", logs=logs)
    assert ex.done == [name] and _same(cache.load(name), _fm(name))


def test_garbage_file_never_reaches_the_user_as_a_bare_safetensor_error(tmp_path):
    ds = DS(2)
    cache, _ = _extract(ds, tmp_path / "f")
    name = ds.frames[1].name
    path = cache.path(name)
    # an older manifest without sizes: the structure is still checked; a header length larger than the file
    m = json.loads(cache.manifest_path.read_text())
    for e in m["images"].values():
        e.pop("bytes"), e.pop("blake2b")
    cache.manifest_path.write_text(json.dumps(m))
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}" * 10)
    fresh = FeatureCache(tmp_path / "f")
    assert not fresh.has(name) and list(fresh.verify()) == [name]
    with pytest.raises(CacheCorruptError, match=rf"{path.name}: damaged .*truncated or not safetensors") as ei:
        fresh.load(name)
    assert ei.value.path == path
    assert _same(fresh.load(ds.frames[0].name), _fm(ds.frames[0].name))  # legacy good entries still load
    cache, ex = _extract(ds, tmp_path / "f")
    assert ex.done == [name] and cache.verify() == {}


def test_corrupt_manifest_is_rebuilt(tmp_path):
    ds = DS(3)
    cache, _ = _extract(ds, tmp_path / "f")
    cache.manifest_path.write_text('{"format": 1, "images": {"a":')
    with pytest.raises(CacheCorruptError, match="manifest.json: corrupt feature cache manifest"):
        FeatureCache(tmp_path / "f").names()
    logs = []
    cache, ex = _extract(ds, tmp_path / "f", logs=logs)
    assert len(ex.done) == 3 and len(cache) == 3 and cache.verify() == {}
    assert any("manifest.json" in m and "starting a new manifest" in m for m in logs)


def test_concurrent_writers_keep_every_entry(tmp_path):
    ex = FakeExtractor()
    cache = FeatureCache(tmp_path / "f").open(ex)
    names = [f"w{k}_{i}.png" for k in range(3) for i in range(12)]

    def work(k):
        c = FeatureCache(tmp_path / "f")
        for n in names[k * 12:(k + 1) * 12]:
            c.save(n, _fm(n))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = FeatureCache(tmp_path / "f")
    assert sorted(fresh.names()) == sorted(names) and fresh.verify() == {}
    assert all(_same(fresh.load(n), _fm(n)) for n in names[::5])
    assert not list(cache.folder.glob("*.tmp")) and not list(cache.folder.glob(".*.tmp"))


def test_factory_lives_in_features():
    from langfield import features
    from langfield.features import cli, factory

    assert features.make_extractor is factory.make_extractor is cli.make_extractor
    assert features.make_text_encoder is factory.make_text_encoder
    ex = factory.make_extractor("labels", text_encoder="offline", device="cpu")
    assert ex.name == "labels" and ex.config()["text"]["type"] == "offline"
    with pytest.raises(ValueError, match="unknown extractor"):
        factory.make_extractor("nope", device="cpu")


# ------------------------------------------------------------------------------------- SAM
class Evil:
    """Unpickling this makes a folder: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def tiny_registry(monkeypatch):
    pytest.importorskip("segment_anything")
    from segment_anything import sam_model_registry

    from tests.test_features import tiny_sam

    calls = []

    def build(checkpoint=None):
        calls.append(checkpoint)
        m = tiny_sam(64)
        with torch.no_grad():
            for q in m.parameters():
                q.fill_(0.5)  # other weights than the saved ones
        return m

    monkeypatch.setitem(sam_model_registry, "vit_b", build)
    return calls, tiny_sam


def test_sam_weights_load_with_weights_only(tmp_path, tiny_registry):
    from langfield.features import WeightsError, load_sam

    calls, tiny_sam = tiny_registry
    ref = tiny_sam(64)
    ck = tmp_path / "sam_tiny.pth"
    torch.save(ref.state_dict(), ck)
    sam = load_sam("vit_b", ck, device="cpu")
    assert calls == [None]  # segment-anything never sees the file (it would unpickle it)
    ref_sd, got = ref.state_dict(), sam.state_dict()
    assert set(ref_sd) == set(got) and all(torch.equal(ref_sd[k], got[k]) for k in ref_sd)
    assert not torch.equal(ref.mask_decoder.iou_token.weight, torch.full_like(ref.mask_decoder.iou_token.weight, .5))
    # {"model": state_dict} wrappers load too
    torch.save({"model": ref.state_dict()}, tmp_path / "wrapped.pth")
    sam2 = load_sam("vit_b", tmp_path / "wrapped.pth", device="cpu")
    assert torch.equal(sam2.mask_decoder.iou_token.weight, ref.mask_decoder.iou_token.weight)

    # a pickle with code in it is refused, and the code does not run
    marker = tmp_path / "pwned"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": Evil(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth as SAM vit_b weights with weights_only=True"):
        load_sam("vit_b", tmp_path / "evil.pth", device="cpu")
    assert not marker.exists()
    # not a state dict, another architecture, missing
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match=r"tensor\.pth: not a SAM state dict"):
        load_sam("vit_b", tmp_path / "tensor.pth", device="cpu")
    sd = ref.state_dict()
    sd.pop(next(iter(sd)))
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"cannot load .*partial\.pth as SAM vit_b weights \(Error"):
        load_sam("vit_b", tmp_path / "partial.pth", device="cpu")
    with pytest.raises(WeightsError, match=r"not found.*nope\.pth"):
        load_sam("vit_b", tmp_path / "nope.pth", device="cpu")
