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
print("RESULT " + json.dumps(out), flush=True)
mode = sys.argv[1]
if mode == "die" and d.rank == 1:
    os._exit(3)                     # killed without a word
if mode == "raise" and d.rank == 1:
    try:
        D.guard_main(lambda: (_ for _ in ()).throw(RuntimeError("cannot read image 7")))
    except RuntimeError:
        time.sleep(0.5); sys.exit(1)
if mode == "hang" and d.rank == 1:
    time.sleep(6)
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
    assert res[1][0] == 1 and res[0][0] == 1
    err = _result(res[0][1], "RESULT2")["error"]
    assert err.startswith("rank 0/2: all_reduce of the gradients failed at step 12: rank 1 failed"), err
    assert "RuntimeError: cannot read image 7" in err, err


@pytest.mark.slow
def test_a_hanging_rank_times_out(tmp_path):
    res = launch(CORE, 2, tmp_path, args=("hang",), timeout=90, env={"LANGFIELD_DIST_TIMEOUT": "2"})
    out = _result(res[0][1], "RESULT2")
    assert "rank 1" in out["error"] and "stopped responding" in out["error"], out
    assert out["s"] < 5.5  # the collective's timeout, not the sleeping rank, ended the wait
