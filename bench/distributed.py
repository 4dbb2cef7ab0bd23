"""Distributed training on the CPU (gloo): communication overhead and the sharded memory model.

1. **Data-parallel overhead**: 2 gloo ranks train the tabletop scene (batch 2, one camera per
   rank) for a few steps at several Gaussian counts; per step, the wall time spent in
   collectives (gradient all-reduce, densification statistics, heartbeats; waiting for the
   slower rank included) as a ratio to the step time, and the step time against one process
   rendering both cameras (same batch, same process count of threads).
2. **Gaussian-sharded memory model**: 2 gloo ranks each own half of N synthetic Gaussians and
   render one camera whose field of view sees a fraction f of them; measured per rank: bytes
   of the shard's state (parameters + Adam moments + gradients), rows gathered for the
   camera, bytes sent per step; against the model
   ``bytes/rank = N/W * 4 P * 4  +  V * 4 P * 2`` (P floats per Gaussian: 59 at SH degree 3;
   parameters, gradient, two Adam moments; the gathered visible rows V and their gradient;
   transient receive buffers of W x max-rows-per-shard x (P + 1) floats come on top).
2b. **Sharded training in the real trainer** (``langfield train --shard-gaussians``): 2 gloo
   ranks train the tabletop scene with N Gaussians, batch 2, densification on, sharded and
   data-parallel (replicated); per rank: the Gaussians it holds and the bytes of their
   parameters + Adam moments (measured on the trainer's tensors after a step), the rows it
   gathered to render its camera, the step time (wall and CPU).

Prints tables and writes bench/results/distributed.json.

    python bench/distributed.py            # both parts (a few minutes on 2 busy cores)
    python bench/distributed.py --quick    # fewer sizes and steps
    python bench/distributed.py --only train   # part 2b alone (merged into the JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _util import machine, print_table, write_json  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args, timeout: float = 900):
    """Run this script's worker as ``world`` ranks (torchrun's environment); their JSON lines."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(HERE.parent))
        if world == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}):\n{out[-3000:]}")
        outs.append(next(json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")))
    return outs


# ---- workers --------------------------------------------------------------------------------------

def worker_dp(scene: str, out: str, n_gauss: int, steps: int, batch: int) -> None:
    import torch

    torch.set_num_threads(1)
    from langfield.train.config import TrainConfig
    from langfield.train.rgb import RGBTrainer

    cfg = TrainConfig(steps=steps, batch_size=batch, densify=True, refine_start_iter=2, refine_every=4,
                      refine_stop_iter=steps, grow_grad2d=1e9, init_random=n_gauss, progress=False,
                      save_renders=False, ckpt_every=10**6, backend="cpu", background="black", sh_degree=3)
    tr = RGBTrainer.create(scene, out, cfg, overwrite=True)
    tr.gaussians.to(tr.device)
    tr.train_step()  # warm-up (first-use costs: caches, allocator)
    job = tr.job
    c0, t0, p0 = job.comm_s, time.perf_counter(), time.process_time()
    for _ in range(steps - 1):
        tr.train_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - p0
    comm = (job.comm_s - c0) / (steps - 1)
    # the transfer alone: the same gradient all-reduce with both ranks ready (after a barrier)
    pure = 0.0
    if job.active:
        import langfield.distributed as D

        params = list(tr.gaussians.splats.values())
        for p in params:
            p.grad = torch.zeros_like(p)
        ts = []
        for _ in range(5):
            job.barrier()
            t1 = time.perf_counter()
            D.all_reduce_grads(params, extra=torch.zeros(2, dtype=torch.float64), dist_=job)
            ts.append(time.perf_counter() - t1)
        pure = min(ts)
    print("RESULT " + json.dumps({"rank": job.rank, "world": job.world, "n": tr.gaussians.num,
                                  "s_per_step": wall / (steps - 1), "cpu_per_step": cpu / (steps - 1),
                                  "comm_per_step": comm, "allreduce_s": pure}), flush=True)


def worker_train(scene: str, out: str, n_gauss: int, steps: int, shard: int) -> None:
    import torch

    torch.set_num_threads(1)
    from langfield.distributed.shard import shard_state_bytes
    from langfield.train.config import TrainConfig
    from langfield.train.rgb import RGBTrainer

    cfg = TrainConfig(steps=steps + 2, batch_size=2, densify=True, refine_start_iter=0, refine_every=2,
                      refine_stop_iter=steps + 2, init_random=n_gauss, progress=False, save_renders=False,
                      ckpt_every=10**6, backend="cpu", background="black", sh_degree=3, shard_gaussians=bool(shard))
    tr = RGBTrainer.create(scene, out, cfg, overwrite=True)
    tr.train_step()  # warm-up (first-use costs)
    job = tr.job
    t0, p0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        tr.train_step()
    wall, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - p0) / steps
    rows = tr.sharder.gathered_rows if tr.sharder is not None else tr.num_global
    print("RESULT " + json.dumps({"rank": job.rank, "n": tr.num_global, "own": tr.gaussians.num,
                                  "state_bytes": shard_state_bytes(tr.gaussians, tr.optimizers),
                                  "gathered_rows": rows, "s_per_step": wall, "cpu_per_step": cpu}), flush=True)


def worker_shard(n: int, fov_scale: float, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    import langfield.distributed as D
    from langfield.distributed.shard import ShardedRenderer, morton_shards, shard_state_bytes
    from langfield.render.model import Cameras
    from langfield.scene import Gaussians

    job = D.init()
    g = torch.Generator().manual_seed(0)
    means = torch.rand(n, 3, generator=g) * 2 - 1
    full = Gaussians(means, torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1),
                     torch.full((n, 3), -4.0), torch.full((n,), -1.0), torch.rand(n, 1, 3, generator=g),
                     torch.zeros(n, 15, 3))
    own = morton_shards(full.means, job.world)[job.rank]
    local = Gaussians.from_dict({k: v.detach()[own] for k, v in full.splats.items()}, requires_grad=True)
    del full
    opt = {k: torch.optim.Adam([p], lr=1e-3) for k, p in local.splats.items()}
    W = H = 64
    f = 32.0 * fov_scale  # a narrower view (larger focal length) sees fewer Gaussians
    vm = torch.eye(4)
    vm[2, 3] = 3.0  # looking down +z at the cube from 3 units away
    cam = Cameras.of(vm.numpy(), [[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], W, H)
    sr = ShardedRenderer(job)
    target = torch.zeros(H, W, 3)
    rows, sent = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        b0 = sr.bytes_sent
        rgb, _a = sr.render(local, cam, backend="cpu", ids=own)
        (rgb - target).abs().mean().backward()
        remote = sr._pending[3]  # the gathered rows this rank rendered, and their gradient
        gathered_bytes = (remote.numel() + remote.grad.numel()) * remote.element_size()
        sr.backward()
        # the memory of this step: the shard's state with its gradient, plus the gathered rows
        # (parameters + id column) and their gradient
        state = shard_state_bytes(local, opt)
        for o in opt.values():
            o.step()
            o.zero_grad()
        rows.append(sr.gathered_rows)
        sent.append(sr.bytes_sent - b0)
    wall = (time.perf_counter() - t0) / steps
    print("RESULT " + json.dumps({"rank": job.rank, "world": job.world, "n": n, "own": len(own),
                                  "visible_rows": rows[-1], "state_bytes": state, "gathered_bytes": gathered_bytes,
                                  "sent_bytes_per_step": sent[-1], "s_per_step": wall}), flush=True)


# ---- the benchmark --------------------------------------------------------------------------------

def bench_dp(sizes, steps: int, workdir: Path):
    scene = _scene_without_points(workdir)
    rows = []
    for n in sizes:
        one = launch(1, ["dp", scene, workdir / f"one{n}", n, steps, 2])[0]
        two = launch(2, ["dp", scene, workdir / f"two{n}", n, steps, 2])
        r0 = max(two, key=lambda r: r["s_per_step"])
        comm = max(r["comm_per_step"] for r in two)
        pure = max(r["allreduce_s"] for r in two)
        n = two[0]["n"]
        rows.append({"gaussians": n, "step_1x2_s": one["s_per_step"], "step_2x1_s": r0["s_per_step"],
                     "speedup": one["s_per_step"] / r0["s_per_step"], "comm_s": comm,
                     "comm_ratio": comm / r0["s_per_step"], "allreduce_s": pure,
                     "allreduce_ratio": pure / r0["s_per_step"], "cpu_step_1x2_s": one["cpu_per_step"],
                     "cpu_step_2x1_s": r0["cpu_per_step"], "allreduce_MB": n * 59 * 4 / 1e6})
    return rows


def _scene_without_points(workdir: Path) -> Path:
    from langfield.scenes import make_scene

    scene = workdir / "scene"
    if not scene.exists():
        make_scene("tabletop", scene, views=12, size=(128, 96), test_every=6)
        tj = scene / "transforms.json"  # no SfM points: --init-random Gaussians of the size asked for
        doc = json.loads(tj.read_text())
        doc.pop("ply_file_path", None)
        tj.write_text(json.dumps(doc))
    return scene


def bench_train(sizes, steps: int, workdir: Path):
    scene = _scene_without_points(workdir)
    rows = []
    for n in sizes:
        rep_ = launch(2, ["train", scene, workdir / f"rep{n}", n, steps, 0])
        sh = launch(2, ["train", scene, workdir / f"sh{n}", n, steps, 1])
        full = max(r["state_bytes"] for r in rep_)
        for r in sh:
            rows.append({"gaussians": r["n"], "rank": r["rank"], "own": r["own"], "own_frac": r["own"] / r["n"],
                         "state_MB": r["state_bytes"] / 1e6, "replicated_MB": full / 1e6,
                         "ratio": r["state_bytes"] / full, "gathered_rows": r["gathered_rows"],
                         "step_sharded_s": r["s_per_step"], "cpu_sharded_s": r["cpu_per_step"],
                         "step_replicated_s": max(x["s_per_step"] for x in rep_),
                         "cpu_replicated_s": max(x["cpu_per_step"] for x in rep_)})
    return rows


def bench_shard(sizes, fovs, steps: int):
    rows = []
    P = 59
    for n in sizes:
        for fs in fovs:
            res = launch(2, ["shard", n, fs, steps])
            for r in res:
                state_model = r["own"] * P * 4 * 4  # parameters, gradient, two Adam moments
                gathered_model = r["visible_rows"] * P * 4 * 2  # rows and their gradient
                rows.append({"N": n, "fov_scale": fs, "rank": r["rank"], "visible_frac":
                             r["visible_rows"] / n, "state_MB": r["state_bytes"] / 1e6,
                             "state_model_MB": state_model / 1e6, "gathered_MB": r["gathered_bytes"] / 1e6,
                             "rank_total_MB": (r["state_bytes"] + r["gathered_bytes"]) / 1e6,
                             "model_total_MB": (state_model + gathered_model) / 1e6,
                             "replicated_MB": n * P * 4 * 4 / 1e6,
                             "sent_MB_per_step": r["sent_bytes_per_step"] / 1e6, "s_per_step": r["s_per_step"]})
    return rows


def worked_example(n: float = 50e6, world: int = 8, visible: float = 0.1, P: int = 59):
    """The memory model for a big scene (bytes per GPU), as printed in the README."""
    per_g = P * 4
    replicated = n * per_g * 4
    shard = n / world * per_g * 4
    gathered = visible * n * per_g * 2
    sent = visible * n / world * (world - 1) * ((P + 1) * 4 + per_g)  # rows out + gradients back
    return {"N": n, "gpus": world, "visible_frac": visible, "replicated_GB": replicated / 1e9,
            "shard_state_GB": shard / 1e9, "gathered_GB": gathered / 1e9, "sharded_total_GB": (shard + gathered) / 1e9,
            "sent_GB_per_step_per_rank": sent / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["train"], help="only part 2b (the sharded trainer); merged into the JSON")
    ap.add_argument("--worker", nargs="+")
    a = ap.parse_args()
    if a.worker:
        kind, rest = a.worker[0], a.worker[1:]
        if kind == "dp":
            worker_dp(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        elif kind == "train":
            worker_train(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            worker_shard(int(rest[0]), float(rest[1]), int(rest[2]))
        return
    load = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    if a.only == "train":  # part 2b alone, merged into the existing results
        with tempfile.TemporaryDirectory() as tmp:
            tr = bench_train([20_000] if a.quick else [20_000, 100_000], 3 if a.quick else 4, Path(tmp))
        print(f"\n2b. the real trainer: --shard-gaussians vs data-parallel (replicated), 2 gloo ranks, batch 2, "
              f"densification on (load {load[0]:.1f})")
        print_table(tr, ["gaussians", "rank", "own", "own_frac", "state_MB", "replicated_MB", "ratio", "gathered_rows",
                         "step_sharded_s", "cpu_sharded_s", "step_replicated_s", "cpu_replicated_s"])
        path = HERE / "results" / "distributed.json"
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc.update({"sharded_trainer": tr, "sharded_trainer_load": [load, os.getloadavg()],
                    "sharded_trainer_wall_s": time.perf_counter() - t0})
        write_json(path, doc)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dp = bench_dp([2_000, 20_000] if a.quick else [2_000, 20_000, 100_000], 4 if a.quick else 8, Path(tmp))
    print(f"\n1. data-parallel overhead, 2 gloo ranks x 1 camera vs 1 process x 2 cameras (128x96, load {load[0]:.1f})")
    print_table(dp, ["gaussians", "step_1x2_s", "step_2x1_s", "speedup", "comm_s", "comm_ratio", "allreduce_s",
                     "allreduce_ratio", "cpu_step_1x2_s", "cpu_step_2x1_s", "allreduce_MB"])
    sh = bench_shard([20_000] if a.quick else [20_000, 80_000], [1.0, 4.0, 16.0], 2 if a.quick else 3)
    print("\n2. Gaussian-sharded memory per rank (2 gloo ranks), measured vs model")
    print_table(sh, ["N", "fov_scale", "rank", "visible_frac", "state_MB", "state_model_MB", "gathered_MB",
                     "rank_total_MB", "model_total_MB", "replicated_MB", "sent_MB_per_step"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = bench_train([20_000] if a.quick else [20_000, 100_000], 3 if a.quick else 4, Path(tmp))
    print("\n2b. the real trainer: --shard-gaussians vs data-parallel (replicated), 2 gloo ranks, batch 2, "
          "densification on")
    print_table(tr, ["gaussians", "rank", "own", "own_frac", "state_MB", "replicated_MB", "ratio", "gathered_rows",
                     "step_sharded_s", "cpu_sharded_s", "step_replicated_s", "cpu_replicated_s"])
    ex = [worked_example(visible=v) for v in (0.05, 0.1, 0.25)]
    print("\n3. worked example: 50M Gaussians (SH degree 3), 8 GPUs")
    print_table(ex, ["N", "gpus", "visible_frac", "replicated_GB", "shard_state_GB", "gathered_GB",
                     "sharded_total_GB", "sent_GB_per_step_per_rank"])
    write_json(HERE / "results" / "distributed.json", {
        "machine": machine(), "load_before": load, "load_after": os.getloadavg(), "quick": a.quick,
        "wall_s": time.perf_counter() - t0, "cpu_s_parent": time.process_time() - c0,
        "data_parallel": dp, "sharded": sh, "sharded_trainer": tr, "worked_example": ex})


if __name__ == "__main__":
    main()
