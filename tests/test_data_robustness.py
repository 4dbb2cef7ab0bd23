"""Dataset robustness (issue #12, data items): image size vs declared w/h, image checks before
training, bad sizes and paths in transforms.json, images-only folders, pycolmap errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from langfield.data import DatasetError, ImageReadError, detect_format, load_dataset

GL = np.diag([1.0, -1.0, -1.0, 1.0])


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGFIELD_DATA_CACHE", str(tmp_path / "cache"))


def save_png(p: Path, arr):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(p)


def view(i):
    a = 0.4 * i
    c2w = np.eye(4)
    c2w[:3, 3] = [np.cos(a) * 3, np.sin(a) * 3, 0.5]
    z = -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3])  # look at the origin (OpenCV z forward)
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w[:3, :3] = np.stack([x, y, z], 1)
    return c2w


def make_ns(root: Path, n=4, size=(32, 24), meta=None, frame=None):
    frames = []
    for i in range(n):
        save_png(root / "images" / f"f{i}.png", np.random.default_rng(i).random((size[1], size[0], 3)))
        fr = {"file_path": f"images/f{i}.png", "transform_matrix": (view(i) @ GL).tolist()}
        if frame:
            frame(i, fr)
        frames.append(fr)
    m = {"fl_x": 30.0, "fl_y": 31.0, "cx": 16.0, "cy": 12.0, "w": 32, "h": 24}
    m.update(meta or {})
    m["frames"] = frames
    (root / "transforms.json").write_text(json.dumps(m))


# ---- (6) image size differs from the declared w/h ----------------------------------------------

def test_nerfstudio_size_mismatch_same_aspect_scales_K(tmp_path):
    make_ns(tmp_path, size=(64, 48))  # declared 32x24, stored 64x48
    with pytest.warns(UserWarning, match="scaling their intrinsics") as rec:
        ds = load_dataset(tmp_path, normalize=False)
    assert sum("scaling their intrinsics" in str(w.message) for w in rec) == 1  # one warning for all
    for f in ds.frames:
        assert (f.width, f.height) == (64, 48)
        assert np.allclose(f.K, [[60, 0, 32], [0, 62, 24], [0, 0, 1]], atol=1e-12)
    assert ds.load_image(0).shape == (48, 64, 3)


def test_nerfstudio_size_mismatch_other_aspect_refused(tmp_path):
    make_ns(tmp_path)
    save_png(tmp_path / "images" / "f2.png", np.zeros((30, 32, 3)))  # 32x30, declared 32x24
    with pytest.raises(DatasetError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "f2.png" in msg and "32x30" in msg and "32x24" in msg and "aspect" in msg and "\n" not in msg


# ---- (8) check every image before training ---------------------------------------------------

def test_verify_images_lists_all_bad_files(tmp_path):
    make_ns(tmp_path, n=6)
    (tmp_path / "images" / "f1.png").write_bytes(b"garbage")
    full = (tmp_path / "images" / "f4.png").read_bytes()
    (tmp_path / "images" / "f4.png").write_bytes(full[: len(full) // 2])  # truncated: the header still reads
    ds = load_dataset(tmp_path)
    with pytest.raises(ImageReadError) as e:
        ds.verify_images()
    msg = str(e.value)
    assert "2 bad file(s)" in msg and "f1.png" in msg and "f4.png" in msg and "skip" in msg and "\n" not in msg
    assert "f0.png" not in msg and len(ds) == 6
    with pytest.raises(ImageReadError, match="f1.png"):
        load_dataset(tmp_path, verify_images=True)
    # skip: the frames of bad files are dropped with one warning
    with pytest.warns(UserWarning, match="skipping 2 of 6"):
        bad = ds.verify_images(skip_bad=True)
    assert len(bad) == 2 and [f.image_path.name for f in ds.frames] == ["f0.png", "f2.png", "f3.png", "f5.png"]
    assert ds[1]["image"].shape == (24, 32, 3)  # indices follow the kept frames
    with pytest.warns(UserWarning, match="skipping 2"):
        ds2 = load_dataset(tmp_path, skip_bad_images=True)
    assert len(ds2) == 4


def test_verify_images_aspect_mask_and_cache(tmp_path, monkeypatch):
    make_ns(tmp_path, frame=lambda i, fr: fr.update(mask_path="masks/m.png") if i == 0 else None)
    save_png(tmp_path / "masks" / "m.png", np.ones((10, 32)))  # wrong aspect for its frame
    ds = load_dataset(tmp_path)
    with pytest.raises(ImageReadError, match=r"m.png: mask is 32x10, its frame expects 32x24"):
        ds.verify_images()
    save_png(tmp_path / "masks" / "m.png", np.ones((24, 32)))
    assert ds.verify_images() == []
    cache = list((tmp_path / "cache" / "image-checks").glob("*.json"))
    assert len(cache) == 1 and len(json.loads(cache[0].read_text())) == 5
    # a second check of unchanged files decodes nothing (in memory and from the JSON)
    import langfield.data.base as base

    calls = []
    monkeypatch.setattr(base, "read_image", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    assert ds.verify_images() == []
    base._CHECKED.clear()
    assert ds.verify_images() == [] and calls == []
    # a changed file is checked again
    (tmp_path / "images" / "f3.png").write_bytes(b"xx")
    monkeypatch.undo()
    monkeypatch.setenv("LANGFIELD_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImageReadError, match="f3.png: not an image file"):
        ds.verify_images()


def test_skip_bad_images_refuses_when_no_training_frame_left(tmp_path):
    make_ns(tmp_path, n=2)
    for i in range(2):
        (tmp_path / "images" / f"f{i}.png").write_bytes(b"bad")
    ds = load_dataset(tmp_path, test_every=0)
    with pytest.raises(DatasetError, match="no training frame left"):
        ds.verify_images(skip_bad=True)


# ---- (11) sizes and paths in transforms.json --------------------------------------------------

@pytest.mark.parametrize("key,value", [("w", 0), ("h", -24), ("w", 31.5)])
def test_nerfstudio_bad_sizes(tmp_path, key, value):
    make_ns(tmp_path, meta={key: value})
    with pytest.raises(DatasetError) as e:
        load_dataset(tmp_path)
    assert f"field '{key}'" in str(e.value) and "positive whole number" in str(e.value)


def test_blender_zero_width(tmp_path):
    meta = {"camera_angle_x": 0.7, "fl_x": 30.0, "w": 0, "h": 24,
            "frames": [{"file_path": "./train/r_0", "transform_matrix": (view(0) @ GL).tolist()}]}
    save_png(tmp_path / "train" / "r_0.png", np.zeros((24, 32, 3)))
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"transforms_train.json: field 'w': must be a positive whole number"):
        load_dataset(tmp_path)


def test_paths_leaving_the_dataset_folder(tmp_path):
    root = tmp_path / "d"
    outside = tmp_path / "elsewhere.png"
    save_png(outside, np.zeros((24, 32, 3)))
    for fp in ("../elsewhere.png", str(outside), "images/../../elsewhere.png"):
        make_ns(root, frame=lambda i, fr, fp=fp: fr.update(file_path=fp) if i == 1 else None)
        with pytest.raises(DatasetError) as e:
            load_dataset(root)
        msg = str(e.value)
        assert "frames[1].file_path" in msg and "leaves the dataset folder" in msg and "allow_outside" in msg
    ds = load_dataset(root, allow_outside=True, normalize=False)
    assert ds.frames[1].image_path.resolve() == outside
    # ../../etc/passwd: refused as leaving the folder; allowed, it is "not an image"
    make_ns(root, frame=lambda i, fr: fr.update(file_path="../../../../../../etc/passwd") if i == 0 else None)
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        load_dataset(root)
    other = root / "notes.txt"
    other.write_text("hello")
    make_ns(root, meta={"w": None, "h": None}, frame=lambda i, fr: fr.update(file_path="notes.txt") if i == 0 else None)
    with pytest.raises(ImageReadError, match=r"notes.txt: not an image file"):
        load_dataset(root)
    # mask and depth paths too; Blender file_path too
    make_ns(root, frame=lambda i, fr: fr.update(mask_path="../elsewhere.png") if i == 0 else None)
    with pytest.raises(DatasetError, match=r"frames\[0\].mask_path.*leaves the dataset folder"):
        load_dataset(root)
    b = tmp_path / "b"
    save_png(b / "train" / "r_0.png", np.zeros((24, 32, 3)))
    (b / "transforms_train.json").parent.mkdir(exist_ok=True)
    (b / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": [
        {"file_path": "../elsewhere", "transform_matrix": (view(0) @ GL).tolist()}]}))
    with pytest.raises(DatasetError, match=r"frames\[0\].file_path.*leaves the dataset folder"):
        load_dataset(b)
    assert load_dataset(b, allow_outside=True, normalize=False).frames[0].image_path.resolve() == outside


# ---- (12) images-only folder; pycolmap errors ---------------------------------------------------

def test_images_only_folder_suggests_process(tmp_path):
    for d in (tmp_path / "a", tmp_path / "b" / "images"):
        save_png(d / "x.jpg", np.zeros((8, 8, 3)))
    with pytest.raises(DatasetError) as e:
        detect_format(tmp_path / "a")
    assert f"langfield process {tmp_path / 'a'} --out DATA" in str(e.value)
    with pytest.raises(DatasetError, match="langfield process .*images --out DATA"):
        load_dataset(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError) as e:
        detect_format(tmp_path / "c")
    assert "no dataset layout recognised" in str(e.value) and "process" not in str(e.value)


def test_colmap_rig_error_names_the_model_file(tmp_path):
    pytest.importorskip("pycolmap")
    d = tmp_path / "sparse" / "0"
    d.mkdir(parents=True)
    (d / "cameras.txt").write_text("1 PINHOLE 32 24 30 30 16 12\n")
    (d / "images.txt").write_text("1 1 0 0 0 0 0 0 1 a.png\n\n")
    (d / "points3D.txt").write_text("")
    (d / "frames.txt").write_text("1 1 1 0 0 0 0 0 0 1 CAMERA 1 1\n")  # a frame of rig 1; no rigs.txt
    save_png(tmp_path / "images" / "a.png", np.zeros((24, 32, 3)))
    with pytest.raises(DatasetError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "Rig with ID 1 does not exist" in msg and str(d) in msg and "rigs" in msg and "\n" not in msg
