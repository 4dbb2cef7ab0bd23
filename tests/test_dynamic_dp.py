"""Data-parallel dynamic (4D) runs: 2 ranks x 1 camera == 1 process x 2 cameras.

The ranks are started the way ``torchrun`` starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on a free port; :func:`test_distributed.launch`, always under a timeout) and call
the dynamic trainer directly. Each step, every rank renders its camera at that frame's time,
the Gaussians' and the deformation field's gradients are summed in one all-reduce, the
densification statistics are reduced before gsplat's DefaultStrategy decides, and the plane
regularisers are added once after the reduction: the checkpoints (canonical Gaussians, field,
both Adams) must equal the single-process batch of two cameras, densification included, and a
run checkpointed by the 2-rank job resumes on one process to the reference's end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_distributed import launch

OPTS = dict(steps=24, batch_size=2, ckpt_every=8, keep_checkpoints=0, init_random=600, sh_degree=1,
            refine_start_iter=3, refine_every=5, refine_stop_iter=14, grow_grad2d=1e-4, background="random",
            progress=False, save_renders=False, device="cpu", backend="cpu")
DYN = dict(resolutions=[8, 16], time_resolution=6, features=4, hidden=16, warmup=4, grid_lr=1e-2, mlp_lr=1e-3)

RANK = """
import json, sys, torch
torch.set_num_threads(1)
import langfield.distributed as D
from langfield.dynamic.train import DynamicConfig, DynamicTrainer
from langfield.train.config import TrainConfig
scene, out, opts, dyn = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
d = D.init()
tr = DynamicTrainer.create_dynamic(scene, out, TrainConfig(**opts), DynamicConfig(**dyn))
tr.train()
print("RESULT " + json.dumps({"rank": d.rank, "step": tr.step, "n": tr.gaussians.num}), flush=True)
"""


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from langfield.scenes.make import make_scene

    out = tmp_path_factory.mktemp("dyn_dp") / "scene"
    make_scene("dynamic", out, kind="dynamic", camera="static", views=3, frames=6, size=(40, 40), fov=40.0,
               max_points=800, workers=1)
    return out


def _ckpt(run: Path, step: int):
    from langfield.io import load_checkpoint

    return load_checkpoint(run / "checkpoints" / f"ckpt_{step:07d}.safetensors").tensors


def _assert_same(a, b, what, atol=2e-5):
    for group in ("splats", "deform", "optim", "deform_optim"):
        fa, fb = a[group], b[group]
        assert fa.keys() == fb.keys(), (what, group)
        for k in fa:
            va, vb = (fa[k], fb[k]) if isinstance(fa[k], dict) else ({"": fa[k]}, {"": fb[k]})
            assert va.keys() == vb.keys(), (what, group, k)
            for n in va:
                assert va[n].shape == vb[n].shape, (what, group, k, n, va[n].shape, vb[n].shape)
                err = float((va[n].float() - vb[n].float()).abs().max()) if va[n].numel() else 0.0
                assert err <= atol, (what, group, k, n, err)


def _result(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert lines, text[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _train_one_process(scene: Path, out: Path, **over):
    from langfield.dynamic.train import DynamicConfig, DynamicTrainer
    from langfield.train.config import TrainConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        tr = DynamicTrainer.create_dynamic(scene, out, TrainConfig(**{**OPTS, **over}), DynamicConfig(**DYN))
        tr.train()
    finally:
        torch.set_num_threads(threads)
    return tr


def test_dynamic_data_parallel_equals_one_process_batch_and_resumes(scene, tmp_path):
    from langfield.dynamic.train import DynamicTrainer

    ref, dp = tmp_path / "ref", tmp_path / "dp"
    tr = _train_one_process(scene, ref)  # one process, two cameras per step
    assert tr.step == 24 and tr.batch == 2
    n8, n16 = (_ckpt(ref, s)["splats"]["means"].shape[0] for s in (8, 16))
    assert n8 != n16  # a densification (and pruning) happened between the checkpoints
    assert float(_ckpt(ref, 24)["deform"]["out.weight"].abs().max()) > 1e-4  # the field trained

    res = launch(RANK, 2, tmp_path, args=(scene, dp, json.dumps(OPTS), json.dumps(DYN)), timeout=120)
    for rc, text in res:
        assert rc == 0, text[-3000:]
    assert [_result(t)["step"] for _rc, t in res] == [24, 24]
    for s in (8, 16, 24):  # 2 ranks x 1 camera == 1 process x 2 cameras, field and densification included
        _assert_same(_ckpt(dp, s), _ckpt(ref, s), f"step {s}")
    doc = json.loads((dp / "config.json").read_text())
    assert doc["model"]["kind"] == "deformable" and doc["train"]["batch_size"] == 2

    # the 2-rank job's checkpoint of step 16 resumes on one process to the reference's end
    one = tmp_path / "one"
    shutil.copytree(dp, one)
    (one / "checkpoints" / "ckpt_0000024.safetensors").unlink()
    (one / "checkpoints" / "ckpt_0000024.json").unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr1 = DynamicTrainer.resume_dynamic(one)
        assert tr1.step == 16
        tr1.train()
    finally:
        torch.set_num_threads(threads)
    _assert_same(_ckpt(one, 24), _ckpt(ref, 24), "resumed on 1 process")
