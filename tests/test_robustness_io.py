"""Checkpoint-file safety (issues #11.7, #12.9, #12.12): tensors paths confined to the
checkpoint's folder, damage detected and reported as CheckpointError naming the file,
fallback to the newest valid checkpoint, quarantine, and file modes that follow the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from langfield.io.checkpoint import (CheckpointError, CheckpointNotFoundError, atomic_write_bytes, atomic_write_json,
                                     latest_valid_checkpoint, load_checkpoint, quarantine_checkpoint,
                                     safetensors_problem, save_checkpoint, verify_checkpoint)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"splats": {"means": torch.randn(50, 3, generator=g), "opacities": torch.randn(50, generator=g)}}


def _save(folder: Path, step: int, seed: int = 0) -> Path:
    save_checkpoint(folder, _tensors(seed), {"lr": 0.1}, step=step)
    return folder / f"ckpt_{step:07d}.json"


def _edit_json(js: Path, **kw):
    doc = json.loads(js.read_text())
    doc.update(kw)
    js.write_text(json.dumps(doc))


@pytest.mark.parametrize("bad", ["../outside.safetensors", "ABS", "sub/ckpt.safetensors", "..", "."])
def test_tensors_path_must_stay_in_the_checkpoint_folder(tmp_path, bad):
    run = tmp_path / "run" / "checkpoints"
    js = _save(run, 10)
    # a valid safetensors outside the folder that the old code would have loaded
    outside = tmp_path / "run" / "outside.safetensors"
    save_checkpoint(outside, _tensors(seed=5), step=3)
    (run / "sub").mkdir()
    save_checkpoint(run / "sub" / "ckpt.safetensors", _tensors(seed=5), step=3)
    _edit_json(js, tensors=str(outside.resolve()) if bad == "ABS" else bad, tensors_bytes=None, tensors_blake2b=None)
    with pytest.raises(CheckpointError, match=r"ckpt_0000010\.json: field 'tensors' must be a file name"):
        load_checkpoint(js)
    with pytest.raises(CheckpointError, match="field 'tensors'"):
        verify_checkpoint(js)


def test_damage_is_a_checkpoint_error_naming_the_file(tmp_path):
    folder = tmp_path / "ck"
    js = _save(folder, 7)
    st = js.with_suffix(".safetensors")
    good = load_checkpoint(js)
    assert torch.equal(good.tensors["splats"]["means"], _tensors()["splats"]["means"]) and good.step == 7
    doc = json.loads(js.read_text())
    assert doc["tensors_bytes"] == st.stat().st_size and len(doc["tensors_blake2b"]) == 64
    data = st.read_bytes()

    # truncated tensors (what a full disk or a kill during a copy leaves)
    for n in (3, 100, len(data) - 1):
        st.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=r"ckpt_0000007\.safetensors: damaged checkpoint tensors"):
            verify_checkpoint(js)
        with pytest.raises(CheckpointError, match=r"ckpt_0000007\.safetensors"):
            load_checkpoint(js)
    # a header length that claims more than the file ("header too large" in safetensors)
    st.write_bytes((10 ** 12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        load_checkpoint(js)
    # same size, one flipped byte in the data: only the checksum sees it
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    st.write_bytes(bytes(flipped))
    assert safetensors_problem(st) is None
    with pytest.raises(CheckpointError, match="contents differ from the checksum"):
        load_checkpoint(js)
    assert load_checkpoint(js, checksum=False).step == 7  # the caller may opt out
    st.write_bytes(data)
    verify_checkpoint(js)
    # corrupt JSON, and a JSON that is not a checkpoint
    js_text = js.read_text()
    js.write_text(js_text[: len(js_text) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt_0000007\.json: corrupt checkpoint JSON"):
        load_checkpoint(js)
    js.write_text(json.dumps({"format": "langfield-checkpoint", "step": "seven"}))
    with pytest.raises(CheckpointError, match="step or tensors_bytes is not an integer"):
        load_checkpoint(js)
    js.write_text(js_text)
    # missing tensors: a CheckpointError that is also a FileNotFoundError
    st.unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"ckpt_0000007\.safetensors: checkpoint tensors not found"):
        load_checkpoint(js)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_legacy_json_without_size_or_digest_still_loads(tmp_path):
    js = _save(tmp_path, 3)
    doc = json.loads(js.read_text())
    del doc["tensors_bytes"], doc["tensors_blake2b"]
    js.write_text(json.dumps(doc))
    assert load_checkpoint(js).step == 3
    st = js.with_suffix(".safetensors")
    st.write_bytes(st.read_bytes()[:-1])  # structure is still checked
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(js)


def test_latest_valid_checkpoint_skips_damaged_newest_and_quarantine(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(folder, step, seed=step)
    p, bad = latest_valid_checkpoint(folder)
    assert p == folder / "ckpt_0000300.json" and bad == []
    s3 = folder / "ckpt_0000300.safetensors"
    s3.write_bytes(s3.read_bytes()[:50])  # truncated
    (folder / "ckpt_0000200.json").write_text("{\"format\": ")  # corrupt JSON
    p, bad = latest_valid_checkpoint(folder)
    assert p == folder / "ckpt_0000100.json"
    assert bad == [folder / "ckpt_0000300.json", folder / "ckpt_0000200.json"]
    assert torch.equal(load_checkpoint(p).tensors["splats"]["means"], _tensors(100)["splats"]["means"])
    moved = quarantine_checkpoint(bad[0])
    assert sorted(m.name for m in moved) == ["ckpt_0000300.json", "ckpt_0000300.safetensors"]
    assert all(m.parent == folder / "corrupt" and m.is_file() for m in moved)
    assert not (folder / "ckpt_0000300.json").exists() and not s3.exists()
    # a second damaged checkpoint of the same name gets a unique name in corrupt/
    _save(folder, 300)
    (folder / "ckpt_0000300.json").write_text("x")
    moved = quarantine_checkpoint(folder / "ckpt_0000300.json")
    assert sorted(m.name for m in moved) == ["ckpt_0000300.1.json", "ckpt_0000300.1.safetensors"]
    quarantine_checkpoint(bad[1])
    p, bad = latest_valid_checkpoint(folder)
    assert p == folder / "ckpt_0000100.json" and bad == []
    for q in folder.iterdir():
        q.unlink() if q.is_file() else None
    assert latest_valid_checkpoint(folder) == (None, [])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from langfield.io.ply import write_ply
    from langfield.scene import Gaussians

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "config.json", {"a": 1})
        st = save_checkpoint(tmp_path / "ck", _tensors(), step=1)
        g = Gaussians.from_points(torch.rand(20, 3), sh_degree=0)
        write_ply(tmp_path / "g.ply", g)
    finally:
        os.umask(old)
    for f in (tmp_path / "a.bin", tmp_path / "config.json", Path(st), tmp_path / "ck" / "ckpt_0000001.json",
              tmp_path / "g.ply"):
        assert stat.S_IMODE(f.stat().st_mode) == mode, f
    assert not [q for q in tmp_path.rglob("*.tmp")]
