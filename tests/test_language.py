"""The language pipeline end to end on a tiny tabletop scene: labels features -> autoencoder ->
latents -> queries, evaluated against the scene's exact query masks; resume, CLI, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from langfield.cli import main

STEPS = 300
LANG_STEPS = 1000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``langfield demo`` at a tiny size: scene, RGB run, language stage, evaluation."""
    from langfield.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    logs = []
    summary = run_demo(out, steps=STEPS, lang_steps=LANG_STEPS, views=16, size="96x96", device="cpu",
                       text_encoder="offline", quiet=True, ae_steps=800, log=logs.append)
    return out, summary, logs


def test_demo_reaches_query_bars(demo):
    out, s, logs = demo
    text = "\n".join(logs)
    assert "offline text encoder" in text and "langfield view" in text and "mIoU" in text
    lang = s["language"]
    # 96x96 images, 14 training views, 300 RGB + 1000 language steps (measured: loc 0.82, mIoU 0.42,
    # 3D mIoU 0.64): bars below the full demo's (256x256: 0.96 / 0.88 / 0.93) but far above chance (~0.05)
    assert lang["primary"] == "names" and lang["n"] >= 20
    assert lang["loc"] >= 0.65, lang
    assert lang["miou"] >= 0.3, lang
    assert lang["miou_3d"] >= 0.45, lang
    m = json.loads((out / "run" / "metrics.json").read_text())
    assert m["psnr"] > 20 and "language" in m  # RGB and language metrics side by side
    rows = m["language"]["rows"]
    assert all(0 <= r["iou"] <= 1 for r in rows)
    assert any((out / "run" / "renders" / "queries").rglob("*_heatmap.png"))


def test_run_layout_and_config(demo):
    out, _, _ = demo
    run = out / "run"
    doc = json.loads((run / "config.json").read_text())
    lang = doc["language"]
    assert lang["levels"] == ["subpart", "part", "whole"] and lang["latent_dim"] == 3
    assert lang["text"]["type"] == "offline" and lang["features"] == "labels"
    assert (run / "autoencoder.safetensors").is_file() and (run / "features" / "manifest.json").is_file()
    assert lang["autoencoder_report"]["heldout_cos"] > 0.95
    from langfield.field import LanguageField

    f = LanguageField.load(run, device="cpu")
    assert f.has_language and f.can_query and f.gaussians.lang.shape[1] == 9 and f.step == LANG_STEPS
    assert len(f.cameras) == 16 and sum(c.split == "test" for c in f.cameras) == 2


def test_field_query_select_and_errors(demo):
    from langfield.eval.language import load_queries
    from langfield.field import LanguageField, NoLanguageError

    out, _, _ = demo
    run = out / "run"
    f = LanguageField.load(run, device="cpu")
    qs = load_queries(out / "data" / "queries.json")
    view = qs.views[0]
    q = next(q for q in view.queries if q.text == "red mug")
    cam = next(c for c in f.cameras if c.name == view.name)
    r = f.render_camera(cam)
    res = f.query(r, q.text)
    gt = torch.from_numpy(q.mask)
    inside = res.heatmap[gt].mean()
    outside = res.heatmap[~gt].mean()
    assert inside > outside + 0.3, (q.text, float(inside), float(outside))
    # level forced by name; bad level; empty text
    assert f.query(r, q.text, level="whole").level == "whole"
    with pytest.raises(ValueError, match="unknown level"):
        f.query(r, q.text, level="huge")
    with pytest.raises(ValueError, match="empty"):
        f.query(r, "  ")
    # 3D: the selected Gaussians' footprint covers the object
    sel = f.select(q.text)
    assert 0 < int(sel.mask.sum()) < f.num
    foot = f.render_selection(sel.mask, cam.viewmat, cam.K, cam.width, cam.height) > 0.5
    assert float((foot & gt).sum()) / float(gt.sum()) > 0.5
    # an RGB-only field refuses queries with a message
    rgb_only = LanguageField(f.gaussians.clone().set_lang(None), cameras=f.cameras)
    with pytest.raises(NoLanguageError, match="no language field"):
        rgb_only.query(rgb_only.render_camera(0), "red mug")


def test_cli_query_eval_and_export(demo, tmp_path, capsys):
    out, _, _ = demo
    run = out / "run"
    dest = tmp_path / "q"
    ply = tmp_path / "sel.ply"
    assert main(["query", str(run), "red mug", "--select-3d", "--out", str(dest), "--ply", str(ply)]) == 0
    rep = json.loads((dest / "query.json").read_text())
    e = rep["queries"][0]
    assert e["text"] == "red mug" and e["selected_gaussians"] > 0 and e["level"] in ("subpart", "part", "whole")
    for k in ("heatmap", "mask", "select3d"):
        assert (dest / e[k]).is_file()
    from langfield.io import read_ply

    g = read_ply(ply)
    assert g.num > 0 and g.lang is None
    with pytest.raises(SystemExit, match="empty query"):
        main(["query", str(run), " "])
    with pytest.raises(SystemExit, match="--view 99"):
        main(["query", str(run), "red mug", "--view", "99"])
    # eval with an explicit queries file, no 3D
    capsys.readouterr()
    assert main(["eval", str(run), "--queries", str(out / "data" / "queries.json"), "--no-3d"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "names" in printed
    m = json.loads((run / "metrics.json").read_text())["language"]
    assert m["all"]["miou_3d"] is None and m["all"]["miou"] > 0


def test_cli_train_features_adds_language_to_rgb_run(demo, tmp_path):
    out, _, _ = demo
    run2 = tmp_path / "run2"
    shutil.copytree(out / "run", run2, ignore=shutil.ignore_patterns("language", "autoencoder.*", "features",
                                                                      "renders"))
    doc = json.loads((run2 / "config.json").read_text())
    doc.pop("language")
    (run2 / "config.json").write_text(json.dumps(doc))
    args = ["train", str(out / "data"), "--out", str(run2), "--features", "labels", "--lang-steps", "40",
            "--ae-steps", "200", "--text-encoder", "offline", "--quiet", "--device", "cpu"]
    assert main(args) == 0
    from langfield.field import LanguageField

    f = LanguageField.load(run2, device="cpu")
    assert f.has_language and f.step == 40
    # other options on the same run: refused with a message naming them; --overwrite-language retrains
    with pytest.raises(SystemExit, match="latent_dim"):
        main(args[:-3] + ["--latent-dim", "4", "--quiet", "--device", "cpu"])
    assert main(args[:-3] + ["--latent-dim", "4", "--quiet", "--device", "cpu", "--overwrite-language"]) == 0
    f = LanguageField.load(run2, device="cpu")
    assert f.latent_dim == 4 and f.gaussians.lang.shape[1] == 12
    assert any(p.name.startswith("replaced-language-") for p in run2.iterdir())


def test_language_resume_is_exact(demo, tmp_path):
    from langfield.train.language import train_language

    out, _, _ = demo
    base = tmp_path / "base"
    shutil.copytree(out / "run", base, ignore=shutil.ignore_patterns("language", "renders"))
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    opts = dict(features="labels", ae_steps=200, text_encoder="offline", device="cpu", progress=False,
                evaluate=False, log=lambda *_: None, ckpt_every=10)
    train_language(a, steps=30, **opts)
    train_language(b, steps=15, **opts)
    train_language(b, steps=30, resume=True, **opts)
    from langfield.field import LanguageField

    la = LanguageField.load(a, device="cpu").gaussians.lang
    lb = LanguageField.load(b, device="cpu").gaussians.lang
    assert torch.equal(la, lb)


def test_masked_l1():
    from langfield.train.language import masked_l1

    pred = torch.zeros(4, 5, 6)
    target = torch.ones(4, 5, 6)
    valid = torch.zeros(4, 5, 2, dtype=torch.bool)
    valid[0, 0, 0] = True  # one pixel of level 0, none of level 1
    assert float(masked_l1(pred, target, valid, 2)) == pytest.approx(1.0)
    valid[:, :, 1] = True
    target[..., 3:] = 3.0
    assert float(masked_l1(pred, target, valid, 2)) == pytest.approx(4.0)


def test_load_queries_errors_and_lerf_format(tmp_path):
    from langfield.eval.language import QueriesError, load_queries

    p = tmp_path / "queries.json"
    p.write_text(json.dumps({"views": [{"file_path": "images/a.png", "queries": [{"text": "mug"}]}]}))
    with pytest.raises(QueriesError, match=r"queries.json: views\[0\].queries\[0\]: missing 'mask'"):
        load_queries(p)
    p.write_text("{not json")
    with pytest.raises(QueriesError, match="not valid JSON"):
        load_queries(p)
    # LERF-ovs label folder: polygons -> masks, one per category (instances merged)
    lerf = tmp_path / "lerf"
    lerf.mkdir()
    (lerf / "frame_00041.json").write_text(json.dumps({
        "info": {"name": "frame_00041.jpg", "width": 40, "height": 30},
        "objects": [{"category": "mug", "segmentation": [[2, 2], [12, 2], [12, 12], [2, 12]]},
                    {"category": "mug", "segmentation": [[20, 20], [30, 20], [30, 28], [20, 28]]},
                    {"category": "spoon", "segmentation": [[0, 0], [5, 0], [5, 5]]}]}))
    qs = load_queries(lerf)
    v = qs.views[0]
    assert v.name == "frame_00041.jpg" and [q.text for q in v.queries] == ["mug", "spoon"]
    m = v.queries[0].mask
    assert m.shape == (30, 40) and m[5, 5] and m[25, 25] and not m[15, 15]
    assert 100 <= m.sum() <= 11 * 11 + 11 * 9
    (lerf / "bad.json").write_text(json.dumps({"objects": []}))
    with pytest.raises(QueriesError, match="bad.json: expected 'info'"):
        load_queries(lerf)


def test_export_with_language_opens_as_field(demo, tmp_path):
    from langfield.field import LanguageField

    out, _, _ = demo
    ply = tmp_path / "scene.ply"
    assert main(["export", str(out / "run"), "--ply", str(ply)]) == 0
    assert ply.with_suffix(".json").is_file() and (tmp_path / "scene.autoencoder.safetensors").is_file()
    f = LanguageField.load(ply, device="cpu")
    run = LanguageField.load(out / "run", device="cpu")
    assert f.has_language and f.can_query and f.levels == run.levels and f.num == run.num
    # same latents -> same 3D selection (decoding is per Gaussian: the world frame does not matter)
    assert torch.equal(f.select("red mug").mask, run.select("red mug").mask)
    plain = tmp_path / "plain.ply"
    assert main(["export", str(out / "run"), "--ply", str(plain), "--no-language"]) == 0
    p = LanguageField.load(plain, device="cpu")
    assert not p.has_language and p.gaussians.lang is None


def test_joint_fine_tuning_moves_geometry_and_latents(demo, tmp_path):
    """--joint: colour and geometry are optimised with the latents (one render pass, RGB loss +
    language L1); the default keeps them frozen."""
    from langfield.io.checkpoint import load_checkpoint
    from langfield.train.language import train_language
    from langfield.train.rgb import RunFolder

    out, _, _ = demo
    base = tmp_path / "joint"
    shutil.copytree(out / "run", base, ignore=shutil.ignore_patterns("language", "renders"))
    rgb = load_checkpoint(RunFolder(base).latest_checkpoint()).tensors["splats"]
    opts = dict(features="labels", ae_steps=200, text_encoder="offline", device="cpu", progress=False,
                evaluate=False, log=lambda *_: None, steps=20)
    train_language(base, joint=True, **opts)
    from langfield.field import LanguageField

    g = LanguageField.load(base, device="cpu").gaussians
    for k in ("means", "sh0", "opacities"):
        assert not torch.equal(g.splats[k], rgb[k]), k
    assert float(g.lang.abs().sum()) > 0
    frozen = tmp_path / "frozen"
    shutil.copytree(out / "run", frozen, ignore=shutil.ignore_patterns("language", "renders"))
    train_language(frozen, **opts)
    g2 = LanguageField.load(frozen, device="cpu").gaussians
    for k in ("means", "sh0", "opacities", "scales", "quats"):
        assert torch.equal(g2.splats[k], rgb[k]), k


def test_dense_clip_language_stage_with_a_tiny_random_clip(demo, tmp_path):
    """The dense path (patch features upsampled to the image, one 'dense' level) end to end with
    a tiny randomly initialised open_clip ViT: the masked L1 falls, the field loads and queries."""
    import open_clip

    from langfield.features import ClipTextEncoder
    from langfield.features.dense_clip import DenseClipExtractor, DenseClipParams
    from langfield.features.models import load_clip
    from langfield.field import LanguageField
    from langfield.train.language import LangConfig, LanguageTrainer

    name = "langfield-test-tiny-vit-lang"
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    d = tmp_path / "clipcfg"
    d.mkdir()
    (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    clip = load_clip(name, device="cpu", random_init=True)
    out, _, _ = demo
    run = tmp_path / "dense"
    shutil.copytree(out / "run", run, ignore=shutil.ignore_patterns("language", "renders", "features", "autoencoder.*"))
    doc = json.loads((run / "config.json").read_text())
    doc.pop("language")
    (run / "config.json").write_text(json.dumps(doc))
    ex = DenseClipExtractor(clip, DenseClipParams(short_side=64))
    tr = LanguageTrainer(run, LangConfig(features="dense-clip", steps=120, ae_steps=150, device="cpu", progress=False),
                         log=lambda *_: None, extractor=ex)
    tr.prepare(resume=False)
    assert tr.levels == ["dense"] and tr.targets.kind == "dense"
    from langfield.render import rasterization
    from langfield.train.language import masked_l1

    @torch.no_grad()
    def mean_l1():  # over every training view
        sp = tr.gaussians.splats
        out = []
        for i in tr.train_idx:
            vm, K = tr._cams[i].viewmats, tr._cams[i].Ks
            f = tr.ds.frames[i]
            r, _, _ = rasterization(sp["means"], sp["quats"], torch.exp(sp["scales"]), torch.sigmoid(sp["opacities"]),
                                    sp["lang"], vm, K, f.width, f.height)
            t, v = tr.targets.get(i)
            out.append(float(masked_l1(r[0], t, v, 1)))
        return float(np.mean(out))

    before = mean_l1()
    for _ in range(120):
        tr.train_step()
    after = mean_l1()
    # random-CLIP patch features are not consistent across views (nothing to agree on), so only a
    # partial fit is possible (measured 0.658 -> 0.601); the labels tests above measure fit quality
    assert after < 0.95 * before, (before, after)
    t, v = tr.targets.get(tr.train_idx[0])
    f0 = tr.ds.frames[tr.train_idx[0]]
    assert t.shape == (f0.height, f0.width, 3) and bool(v.all())
    tr.save_checkpoint()
    f = LanguageField.load(run, device="cpu", text_encoder=ClipTextEncoder(clip))
    assert f.has_language and f.levels == ["dense"] and f.gaussians.lang.shape[1] == 3
    r = f.render_camera(0)
    res = f.query(r, "a red mug")
    assert res.heatmap.shape == r.alpha.shape and str(res.level) == "dense"
