"""Build on first use: cache keyed by sources, safe concurrent builds, clear fallback without a compiler."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code, env_extra, timeout=300):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def test_two_processes_build_at_once(tmp_path):
    """Two fresh processes race to build into one empty cache: both load a complete library."""
    code = """
        from langfield.render._build import build_library, load_library
        res = build_library("cpu")
        lib = load_library("cpu")
        print("BUILT" if res.built else "CACHED", lib.lf_abi_version(), res.path)
    """
    env = {"LANGFIELD_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=str(ROOT))
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = [o.strip().splitlines()[-1] for o, _ in outs]
    assert sorted(line.split()[0] for line in lines) == ["BUILT", "CACHED"], lines
    assert lines[0].split()[2] == lines[1].split()[2]  # same cache entry
    libs = list(tmp_path.glob("cpu-*/liblangfield_cpu.so"))
    assert len(libs) == 1
    assert not list(tmp_path.glob("cpu-*/*.tmp"))  # no half-written files left


def test_cache_key_changes_with_sources(tmp_path, monkeypatch):
    from langfield.render import _build

    monkeypatch.setenv("LANGFIELD_CACHE_DIR", str(tmp_path))
    cmd = _build._commands("cpu", Path("x.so"))[0]
    k1 = _build._key("cpu", cmd)
    k2 = _build._key("cpu", cmd + ["-DEXTRA"])
    assert k1 != k2 and len(k1) == 20


def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    code = """
        import warnings
        warnings.simplefilter("always")
        import torch
        from langfield.render import rasterization
        from langfield.render.synthetic import random_scene
        s = random_scene(50, C=1, width=20, height=16)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out, alpha, meta = rasterization(**s.params(), backend="auto")
            out2, _, meta2 = rasterization(**s.params(), backend="auto")
        msgs = [str(x.message) for x in w if "native" in str(x.message)]
        print("BACKEND", meta["backend"], meta2["backend"], "WARNINGS", len(msgs))
        print(msgs[0])
        try:
            rasterization(**s.params(), backend="cpu")
        except Exception as e:
            print("EXPLICIT", type(e).__name__, str(e).splitlines()[0])
    """
    res = _run(code, {"LANGFIELD_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/g++",
                      "PATH": str(Path(sys.executable).parent)})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "BACKEND torch torch WARNINGS 1" in out, out
    assert "no C++ compiler found" in out
    assert "EXPLICIT NativeBuildError" in out


def test_cli_build_reports(tmp_path):
    res = _run("import sys; from langfield.cli import main; sys.exit(main(['build', '--cuda', 'False']))",
               {"LANGFIELD_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "[cpu] built in" in res.stdout and "threads:" in res.stdout
    res2 = _run("import sys; from langfield.cli import main; sys.exit(main(['build', '--cuda', 'False']))",
                {"LANGFIELD_CACHE_DIR": str(tmp_path)})
    assert "[cpu] up to date (cached)" in res2.stdout


def test_openmp_and_own_pool_builds_render_the_same(tmp_path):
    """Both threading builds (OpenMP shared with torch, our own pool) give bit-identical renders and
    gradients, with several threads, and the OpenMP build binds to torch's own libgomp."""
    code = """
        import os, sys, torch
        from langfield.render import rasterization
        from langfield.render._build import build_library, load_library
        from langfield.render.synthetic import random_scene
        res = build_library("cpu")
        lib = load_library("cpu")
        assert ("-fopenmp" in res.command) == (os.environ["LANGFIELD_OPENMP"] == "1"), res.command
        assert lib.lf_cpu_openmp() == int(os.environ["LANGFIELD_OPENMP"])
        gomp = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l})
        assert len(gomp) <= 1, gomp  # never a second OpenMP runtime
        s = random_scene(3000, C=2, width=67, height=45, D=5, seed=3)
        p = {k: (v.requires_grad_(True) if k in ("means", "colors", "opacities") else v)
             for k, v in s.params().items()}
        out, alpha, meta = rasterization(**p, backend="cpu", render_mode="RGB+ED")
        (out.square().sum() + alpha.sum()).backward()
        torch.save({"out": out.detach(), "alpha": alpha.detach(), "gm": p["means"].grad,
                    "gc": p["colors"].grad, "go": p["opacities"].grad}, sys.argv[1])
    """
    outs = {}
    for omp in ("1", "0"):
        f = tmp_path / f"omp{omp}.pt"
        env = dict(os.environ, LANGFIELD_CACHE_DIR=str(tmp_path / "cache"), LANGFIELD_OPENMP=omp,
                   LANGFIELD_NUM_THREADS="3")
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(f)], capture_output=True,
                             text=True, env=env, timeout=300, cwd=str(ROOT))
        assert res.returncode == 0, res.stderr[-3000:]
        import torch

        outs[omp] = torch.load(f, weights_only=True)
    for k in outs["1"]:
        assert torch.equal(outs["1"][k], outs["0"][k]), k
