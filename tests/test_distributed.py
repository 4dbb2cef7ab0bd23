"""torch.distributed on the CPU (gloo), with ranks started by the tests themselves.

Each test launches WORLD_SIZE processes with the environment ``torchrun`` sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), always under a timeout, and
reads back what each rank wrote. One test goes through the real ``torchrun`` (the CLI).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, world: int, tmp: Path, *, timeout: float = 60, env=None, args=(), kill=None):
    """Run ``script`` (Python source) as ``world`` ranks; returns [(returncode, output), ...].
    ``kill``: (rank, seconds) -> that rank is killed (SIGKILL) after so many seconds."""
    path = tmp / f"rank_script_{abs(hash(script)) % 10**8}.py"
    path.write_text(textwrap.dedent(script))
    port = free_port()
    procs = []
    for r in range(world):
        e = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LANGFIELD_DIST_TIMEOUT="30", OMP_NUM_THREADS="1",
                 PYTHONPATH=str(ROOT))
        e.update(env or {})
        out = open(tmp / f"rank{r}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(path), *map(str, args)], env=e, stdout=out,
                                       stderr=subprocess.STDOUT, cwd=tmp), out))
    t0 = time.monotonic()
    killed = False
    res = []
    try:
        for r, (p, out) in enumerate(procs):
            while True:
                if kill is not None and not killed and time.monotonic() - t0 > kill[1]:
                    procs[kill[0]][0].kill()
                    killed = True
                left = timeout - (time.monotonic() - t0)
                try:
                    p.wait(timeout=min(0.2, max(left, 0.01)))
                    break
                except subprocess.TimeoutExpired:
                    if left <= 0:
                        raise AssertionError(f"rank {r} still running after {timeout} s (a hang)")
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
    for r, (p, _) in enumerate(procs):
        res.append((p.returncode, (tmp / f"rank{r}.log").read_text()))
    return res


def test_single_process_has_no_group(monkeypatch):
    import langfield.distributed as D

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    D.shutdown()
    d = D.init()
    assert not d.active and d.world == 1 and d.rank == 0 and d.is_main
    assert not torch.distributed.is_initialized()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    extra = D.all_reduce_grads([p], extra=torch.tensor([5.0]))
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and float(extra) == 5.0
    d.check_same("configuration", {"a": 1})
    d.check_params({"x": p}, 0)
    assert d.on_main(lambda: 7) == 7
    D.barrier()
    monkeypatch.setenv("WORLD_SIZE", "two")
    D.shutdown()
    with pytest.raises(D.DistError, match="WORLD_SIZE='two'"):
        D.init()
    D.shutdown()


def test_batch_learning_rates_follow_gsplat_and_bad_batches_are_refused(tmp_path):
    from langfield.distributed.dp import batch_adam_kwargs
    from langfield.train.config import TrainConfig

    assert batch_adam_kwargs(1) == (1.0, {"eps": 1e-15, "betas": (0.9, 0.999)})
    f, kw = batch_adam_kwargs(4)
    assert f == 2.0 and kw["eps"] == pytest.approx(5e-16) and kw["betas"] == pytest.approx((0.6, 0.996))
    assert batch_adam_kwargs(4, scaling=False)[0] == 1.0
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        TrainConfig(batch_size=0).validate()
    assert TrainConfig().resolved().batch_size == 1 and TrainConfig().resolved(world_size=4).batch_size == 4
    assert TrainConfig(batch_size=8).resolved(world_size=4).batch_size == 8


CORE = """
import json, os, sys, time, torch
import langfield.distributed as D
d = D.init()
out = {"rank": d.rank, "world": d.world}
# gradients: one flat all-reduce, the extra scalars ride along
p = torch.nn.Parameter(torch.zeros(4)); q = torch.nn.Parameter(torch.zeros(2, 2))
p.grad = torch.arange(4.0) * (d.rank + 1)   # q.grad stays None on rank 0
if d.rank == 1:
    q.grad = torch.ones(2, 2)
ex = D.all_reduce_grads([p, q], extra=torch.tensor([float(d.rank), 1.0]))
out["p"] = p.grad.tolist(); out["q"] = q.grad.tolist(); out["extra"] = ex.tolist()
# broadcast of parameters
w = {"means": torch.full((3, 3), float(d.rank))}
D.broadcast_params(w); out["bcast"] = w["means"].sum().item()
# same config: passes; different: refused on every rank with one message
d.check_same("configuration", {"steps": 10, "data": "/x"})
try:
    d.check_same("configuration", {"steps": 10 + d.rank, "data": "/x"})
except D.DistError as e:
    out["mismatch"] = str(e)
d.check_params({"means": w["means"]}, 5)
try:
    d.check_params({"means": w["means"] + (1e-7 if d.rank == 1 else 0.0), "quats": w["means"]}, 7)
except D.DistError as e:
    out["diverged"] = str(e)
# rank 0 refuses: every rank raises the same error
try:
    d.on_main(lambda: (_ for _ in ()).throw(ValueError("--out /r already holds a run")), errors=(ValueError,))
except ValueError as e:
    out["on_main"] = str(e)
def _alone():  # rank 0's stage that is not data-parallel sees a job of one; the job is back afterwards
    with D.alone() as a:
        return [a.world, D.get().world, D.get().active, D.get().rank]
out["alone"] = d.on_main(_alone)
out["after"] = [D.get().world, D.get().active, D.get() is d]
print("RESULT " + json.dumps(out), flush=True)
mode = sys.argv[1]
if mode == "die" and d.rank == 1:
    os._exit(3)                     # killed without a word
if mode == "raise" and d.rank == 1:
    try:
        D.guard_main(lambda: (_ for _ in ()).throw(RuntimeError("cannot read image 7")))
    except RuntimeError:
        time.sleep(0.5); sys.exit(1)
t0 = time.time()
try:
    d.set_step(12)
    d.barrier("all_reduce of the gradients")
    print("RESULT2 " + json.dumps({"ok": True}), flush=True)
except D.DistError as e:
    print("RESULT2 " + json.dumps({"error": str(e), "s": time.time() - t0}), flush=True)
    sys.exit(1)
"""


def _result(text: str, key: str = "RESULT"):
    for line in text.splitlines():
        if line.startswith(key + " "):
            return json.loads(line[len(key) + 1:])
    raise AssertionError(f"no {key} line in:\n{text[-3000:]}")


def test_collectives_checks_and_a_failing_rank(tmp_path):
    res = launch(CORE, 2, tmp_path, args=("raise",), timeout=90)
    r0, r1 = _result(res[0][1]), _result(res[1][1])
    for r in (r0, r1):
        assert r["p"] == [0.0, 3.0, 6.0, 9.0] and r["q"] == [[1.0, 1.0], [1.0, 1.0]] and r["extra"] == [1.0, 2.0]
        assert r["bcast"] == 0.0  # rank 0's values everywhere
        assert "the ranks disagree on the configuration: steps (rank 0: 10, rank 1: 11)" in r["mismatch"]
        assert "diverged across ranks at step 7 (rank 1 differs from rank 0 in 'means';" in r["diverged"]
        assert "quats" not in r["diverged"]
        assert r["on_main"] == "--out /r already holds a run"
        assert r["alone"] == [1, 1, False, 0] and r["after"] == [2, True, True]
    assert res[1][0] == 1 and res[0][0] == 1
    err = _result(res[0][1], "RESULT2")["error"]
    assert err.startswith("rank 0/2: all_reduce of the gradients failed at step 12: rank 1 failed"), err
    assert "RuntimeError: cannot read image 7" in err, err


# ---- sharded feature extraction ---------------------------------------------------------------

@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from langfield.scenes import make_scene

    out = tmp_path_factory.mktemp("tabletop")
    make_scene("tabletop", out, views=8, size=(64, 48), test_every=4, max_points=1500)
    return out


def torchrun(args, tmp: Path, nproc: int = 2, timeout: float = 90, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), LANGFIELD_DIST_TIMEOUT="30", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *map(str, args)]
    return subprocess.run(cmd, env=e, cwd=tmp, capture_output=True, text=True, timeout=timeout)


def test_sharded_extraction_writes_the_same_cache_and_resumes(scene, tmp_path):
    from langfield.cli import main
    from langfield.data import load_dataset
    from langfield.features import make_extractor
    from langfield.features.cache import FeatureCache, extract_dataset

    ref, run = tmp_path / "ref", tmp_path / "run"
    opts = ["--extractor", "labels", "--text-encoder", "offline"]
    assert main(["extract", "--data", str(scene), "--run", str(ref), *opts]) == 0
    # a job killed after 3 images (and another writer's temporary file that nobody may delete)
    ds = load_dataset(scene)
    extract_dataset(ds, make_extractor("labels", text_encoder="offline"), run / "features", indices=[0, 1, 2],
                    log=lambda *_: None, progress=False)
    done = {n: (run / "features" / FeatureCache(run / "features").manifest["images"][n]["file"]).stat().st_mtime_ns
            for n in FeatureCache(run / "features").names()}
    (run / "features" / ".other-writer.tmp").write_bytes(b"x")
    p = torchrun(["-m", "langfield", "extract", "--data", scene, "--out", run, *opts], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("features: ")] == [
        f"features: 8 images in {run / 'features'} (labels, 512-d, levels subpart, part, whole); text encoder: "
        f"offline (hashed names, not CLIP)"]  # rank 0 alone reports
    # each rank skipped its finished share (interleaved: rank 0 has 0 2 4 6, rank 1 has 1 3 5 7)
    assert "2 of 4 images already" in p.stdout and "[rank 1/2] [labels] 1 of 4 images already" in p.stdout
    a, b = FeatureCache(ref / "features"), FeatureCache(run / "features")
    assert a.manifest["images"] == b.manifest["images"] and len(b) == 8
    for n in a.names():
        assert a.path(n).read_bytes() == b.path(n).read_bytes(), n  # byte-identical features
    for n, t in done.items():  # finished images were not recomputed
        assert b.path(n).stat().st_mtime_ns == t
    assert (run / "features" / ".other-writer.tmp").exists()
    assert not [f for f in (run / "features").iterdir() if f.name.endswith(".tmp") and "other" not in f.name]


# ---- data-parallel RGB training ---------------------------------------------------------------

DP_OPTS = dict(steps=24, batch_size=2, downscale=2, ckpt_every=8, keep_checkpoints=0, refine_start_iter=3,
               refine_every=5, refine_stop_iter=14, grow_grad2d=2e-4, background="random", progress=False,
               save_renders=False, backend="cpu")

LANG_OPTS = dict(features="labels", text_encoder="offline", steps=6, ae_steps=30, ckpt_every=3, keep_checkpoints=0,
                 device="cpu", backend="cpu", progress=False)

DP = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
import langfield.distributed as D
from langfield.train.rgb import train_rgb, RunError
scene, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
opts = json.loads(sys.argv[4])
d = D.init()
mem = {}
class Stop(Exception):
    pass
def die(tr):
    if mode == "kill" and d.rank == 1 and tr.step == 20:
        os.kill(os.getpid(), signal.SIGKILL)   # no word, no cleanup: a crashed node
    if mode == "stop" and tr.step == 16 and not mem.get("resumed"):
        raise Stop()                           # every rank stops after the checkpoint of step 16
    from langfield.distributed.shard import shard_state_bytes
    mem.update(state=shard_state_bytes(tr.gaussians, tr.optimizers), own=tr.gaussians.num, n=tr.num_global)
try:
    if mode == "mismatch":   # rank 1 was started with another seed: refused before any step, on both ranks
        try:
            train_rgb(scene, out + "-mm", **{**opts, "seed": d.rank})
        except D.DistError as e:
            print("MISMATCH " + json.dumps(str(e)), flush=True)
        m = train_rgb(scene, out, resume=True, progress=False)
        from langfield.train.language import train_language
        train_language(out, evaluate=False, log=lambda *_: None, **json.loads(sys.argv[5]))
    else:
        try:
            m = train_rgb(scene, out, hooks=[die], **opts)
        except Stop:                           # ... and the job resumes (the shards cut again)
            mem["resumed"] = True
            m = train_rgb(scene, out, resume=True, hooks=[die], progress=False)
    print("RESULT " + json.dumps({"rank": d.rank, "step": m.get("step"), "n": m.get("num_gaussians"), **mem}),
          flush=True)
except (D.DistError, RunError) as e:
    print("ERROR " + json.dumps(str(e)), flush=True)
    sys.exit(1)
"""


def _splats(path: Path, step: int):
    from langfield.io import load_checkpoint

    return load_checkpoint(path / "checkpoints" / f"ckpt_{step:07d}.safetensors").tensors["splats"]


def _assert_same(a, b, what, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (what, k, a[k].shape, b[k].shape)  # same densification decisions
        err = float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0
        assert err <= atol, (what, k, err)


@pytest.fixture(scope="module")
def dp_ref(scene, tmp_path_factory):
    """The reference of the data-parallel and sharded tests: one process, two cameras per
    step (DP_OPTS: a densification between steps 8 and 16); with its parameter + Adam bytes."""
    from langfield.distributed.shard import shard_state_bytes
    from langfield.train.rgb import train_rgb

    ref = tmp_path_factory.mktemp("dp_ref") / "ref"
    mem = {}
    m = train_rgb(scene, ref, hooks=[lambda tr: mem.update(state=shard_state_bytes(tr.gaussians, tr.optimizers))],
                  **DP_OPTS)
    return ref, m, mem["state"]


def test_data_parallel_equals_one_rank_batch_survives_a_killed_rank_and_resumes(scene, dp_ref, tmp_path):
    import shutil

    from langfield.train.rgb import train_rgb

    ref, m_ref, _ = dp_ref
    dp = tmp_path / "dp"
    n0 = _splats(ref, 8)["means"].shape[0]
    assert _splats(ref, 16)["means"].shape[0] != n0  # a densification (and pruning) happened between

    # two ranks x one camera; rank 1 is killed at step 20 -> rank 0 stops at once naming it
    res = launch(DP, 2, tmp_path, args=(scene, dp, "kill", json.dumps(DP_OPTS)), timeout=120)
    assert res[1][0] == -9 and res[0][0] == 1, res[0][1][-2000:]
    err = _result(res[0][1], "ERROR")
    assert err.startswith("rank 0/2: all_reduce of the gradients failed at step 20: rank 1"), err
    assert "stopped responding" in err
    for s in (8, 16):  # 2 ranks x 1 camera == 1 rank x 2 cameras, densification included
        _assert_same(_splats(dp, s), _splats(ref, s), f"step {s}")
    assert not (dp / "checkpoints" / "ckpt_0000024.safetensors").exists()

    # resume with another world size (1 rank, the same global batch): the reference's end
    one = tmp_path / "one"
    shutil.copytree(dp, one)
    (one / ".lock").unlink(missing_ok=True)
    m_one = train_rgb(scene, one, resume=True, progress=False)
    _assert_same(_splats(one, 24), _splats(ref, 24), "resumed on 1 rank")
    assert m_one["num_gaussians"] == m_ref["num_gaussians"] and abs(m_one["psnr"] - m_ref["psnr"]) < 1e-3

    # ranks that disagree are refused at start; then the killed job resumes on 2 ranks
    res = launch(DP, 2, tmp_path, args=(scene, dp, "mismatch", json.dumps(DP_OPTS), json.dumps(LANG_OPTS)),
                 timeout=180)
    for rc, text in res:
        mm = _result(text, "MISMATCH")
        assert mm.startswith("the ranks disagree on the training configuration and data: config.seed (rank 0: 0, "
                             "rank 1: 1)"), mm
        assert rc == 0, text[-2000:]
    assert _result(res[0][1])["step"] == 24 and _result(res[1][1])["step"] is None  # rank 0 evaluates
    _assert_same(_splats(dp, 24), _splats(ref, 24), "resumed on 2 ranks")
    m_dp = json.loads((dp / "metrics.json").read_text())
    assert abs(m_dp["psnr"] - m_ref["psnr"]) < 1e-3 and m_dp["num_gaussians"] == m_ref["num_gaussians"]

    # the language stage: features extracted by both ranks, codec fitted by rank 0, latents
    # trained on 2 ranks x 1 view == 1 process x 2 views
    from langfield.run import RunFolder
    from langfield.train.language import train_language

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (the codec fit's reductions then add in the same order)
    try:
        train_language(ref, evaluate=False, log=lambda *_: None, batch_size=2, **LANG_OPTS)
    finally:
        torch.set_num_threads(threads)
    a, b = (RunFolder(r).store("language").latest()[1] for r in (ref, dp))
    assert a.step == b.step == 6 and json.loads((dp / "config.json").read_text())["language"]["config"]["batch_size"] == 2
    _assert_same({"lang": b.tensors["splats"]["lang"]}, {"lang": a.tensors["splats"]["lang"]}, "language", atol=1e-5)
    assert float(a.tensors["splats"]["lang"].abs().max()) > 1e-3  # it trained
    assert not (tmp_path / "dp-mm").exists() or not any((tmp_path / "dp-mm").iterdir())


# ---- Gaussian-sharded training ----------------------------------------------------------------

def _assert_close_sharded(a, b, what):
    """Same shapes (the same densification decisions) and float-level agreement. A shard's
    activations (exp, sigmoid) run over other tensor lengths than the replicated ones, so a
    value may differ in its last bit (SIMD body vs tail); Adam (eps 1e-15) turns such noise on
    near-zero gradients into whole steps for a few rows (about 0.1 %, mostly rotations of
    round Gaussians), so the bulk is compared tightly and the largest difference loosely."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (what, k, a[k].shape, b[k].shape)
        if not a[k].numel():
            continue
        d = (a[k] - b[k]).abs()
        assert float(d.mean()) < 1e-5, (what, k, float(d.mean()))
        assert float((d > 1e-5).float().mean()) < 0.01, (what, k, float((d > 1e-5).float().mean()))
        assert float(d.max()) < (2e-2 if k == "quats" else 2e-3), (what, k, float(d.max()))


def test_gaussian_sharded_training_equals_data_parallel_and_resumes_on_one_rank(scene, dp_ref, tmp_path):
    """2 ranks x 1 camera with --shard-gaussians == 1 process x 2 cameras (== 2 data-parallel
    ranks, above), densification included: the same Gaussians are grown, split and pruned
    (equal shapes), parameters within float tolerance; each rank holds about half of the
    parameter + Adam bytes; the gathered checkpoint resumes sharded and in one process."""
    import shutil

    from langfield.cli import main

    ref, m_ref, ref_bytes = dp_ref
    sh = tmp_path / "sh"
    # stopped after step 16 and resumed sharded (the checkpoint cut into Morton shards again)
    res = launch(DP, 2, tmp_path, args=(scene, sh, "stop", json.dumps({**DP_OPTS, "shard_gaussians": True})),
                 timeout=180)
    assert all(rc == 0 for rc, _ in res), res[0][1][-3000:] + res[1][1][-3000:]
    outs = [_result(t) for _, t in res]
    assert json.loads((sh / "config.json").read_text())["train"]["shard_gaussians"] is True
    n8 = _splats(ref, 8)["means"].shape[0]
    assert _splats(ref, 16)["means"].shape[0] != n8  # a densification (and pruning) happened between
    for s in (8, 16, 24):  # gathered in global order: the data-parallel checkpoint
        _assert_close_sharded(_splats(sh, s), _splats(ref, s), f"sharded step {s}")
    m_sh = json.loads((sh / "metrics.json").read_text())
    assert m_sh["num_gaussians"] == m_ref["num_gaussians"] and abs(m_sh["psnr"] - m_ref["psnr"]) < 0.05
    n = m_ref["num_gaussians"]
    assert sorted(o["own"] for o in outs)[0] > 0 and sum(o["own"] for o in outs) == n == outs[0]["n"]
    for o in outs:  # each rank holds its shard's parameters and Adam moments only
        assert o["state"] == pytest.approx(ref_bytes * o["own"] / n, rel=0.01), (o["state"], ref_bytes)
        assert o["own"] < 0.75 * n

    # the gathered checkpoint of step 16 resumes in one process (not sharded) to the reference's end
    one = tmp_path / "one"
    shutil.copytree(sh, one)
    (one / ".lock").unlink(missing_ok=True)
    (one / "checkpoints" / "ckpt_0000024.safetensors").unlink()
    (one / "checkpoints" / "ckpt_0000024.json").unlink()
    (one / "metrics.json").unlink()
    assert main(["train", str(scene), "--out", str(one), "--resume", "--quiet"]) == 0  # the stored options
    _assert_close_sharded(_splats(one, 24), _splats(ref, 24), "sharded, resumed on 1 rank")
    m_one = json.loads((one / "metrics.json").read_text())
    assert m_one["num_gaussians"] == n and m_one["step"] == 24


# ---- heartbeats -----------------------------------------------------------------------------------

HEART = """
import json, os, signal, sys, time
import langfield.distributed as D
d = D.init()
mode = sys.argv[1]
t0 = time.time()
def slow():                      # long local work on rank 0 (a codec fit): 1.5 x the timeout, busy
    end = time.time() + 1.5 * d.timeout_s
    x = 0
    while time.time() < end:
        x += 1
    return "fitted"
try:
    if mode == "slow":
        out = d.on_main(slow, what="rank 0 fitting the codec")
        d.barrier("after the fit")
        print("RESULT " + json.dumps({"out": out, "s": time.time() - t0}), flush=True)
        if d.rank == 1:
            time.sleep(1.5 * d.timeout_s)    # alive but late for the next collective
        t1 = time.time()
        d.set_step(12)
        d.barrier("all_reduce of the gradients")
    else:                                    # rank 1 freezes (SIGSTOP) while rank 0 waits for it
        d.barrier("start")
        if d.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        t1 = time.time()
        d.wait_all("extraction")
except D.DistError as e:
    print("RESULT2 " + json.dumps({"error": str(e), "s": time.time() - t1}), flush=True)
    if mode == "frozen":
        os.kill(int(d._store_get("beat/1").split("|")[-1]), signal.SIGKILL)  # the stopped rank
    sys.exit(1)
"""


@pytest.mark.slow
def test_heartbeats_wait_for_slow_local_work_and_name_a_late_or_frozen_rank(tmp_path):
    env = {"LANGFIELD_DIST_TIMEOUT": "2"}
    res = launch(HEART, 2, tmp_path, args=("slow",), timeout=90, env=env)
    for rc, text in res:  # rank 0 worked for 3 s > the 2 s timeout: the others waited
        assert _result(text)["out"] == "fitted", text[-2000:]
    out = _result(res[0][1], "RESULT2")
    assert "rank 1" in out["error"] and "stopped responding" in out["error"], out
    assert out["s"] < 3.5  # the collective's timeout, not the sleeping rank, ended the wait
    res = launch(HEART, 2, tmp_path, args=("frozen",), timeout=90, env=env)
    out = _result(res[0][1], "RESULT2")
    assert out["error"].startswith("rank 0/2: waiting for the other ranks (extraction): rank 1 stopped responding "
                                   "(no heartbeat for 2 s"), out
    assert out["s"] < 4.5 and res[1][0] == -9


def test_dynamic_run_through_the_cli_is_data_parallel(tmp_path):
    """`torchrun -m langfield train` on time-stamped data: a data-parallel dynamic run (batch =
    the 2 ranks) whose Gaussians and deformation field equal one process with --batch-size 2."""
    from langfield.io import load_checkpoint
    from langfield.scenes.make import make_scene

    scene = tmp_path / "dyn"
    make_scene("dynamic", scene, kind="dynamic", camera="static", views=3, frames=6, size=(32, 32), fov=40.0,
               max_points=400, workers=1)
    opts = ["--device", "cpu", "--backend", "cpu", "--steps", "10", "--init-random", "300", "--warmup", "4",
            "--ckpt-every", "10", "--quiet"]
    r = torchrun(["-m", "langfield", "train", scene, "--out", tmp_path / "dp", *opts], tmp_path, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "held-out (view, time) pairs" in r.stdout and r.stdout.count("held-out") == 1  # rank 0 reports
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, "-m", "langfield", "train", str(scene), "--out", str(tmp_path / "one"),
                          "--batch-size", "2", *opts], env=e, cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    cfg = json.loads((tmp_path / "dp" / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 2 and cfg["stage"] == json.loads(
        (tmp_path / "one" / "config.json").read_text())["stage"]
    a = load_checkpoint(tmp_path / "dp" / "checkpoints" / "ckpt_0000010.safetensors").tensors
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt_0000010.safetensors").tensors
    for group in ("splats", "deform"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert a[group][k].shape == b[group][k].shape, (group, k)
            assert float((a[group][k].float() - b[group][k].float()).abs().max()) <= 2e-5, (group, k)
