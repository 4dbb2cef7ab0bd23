"""The native self-test (render/selftest.py) on the CPU: passes on the real backend, fails on injected
mismatches (forward and backward), warns once, is recorded next to the library, and demotes
backend="auto"; plus the CPU feature flags in the native build's cache key."""

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch

from langfield.render import _build, rasterization, resolve_backend
from langfield.render import selftest as st

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No results from other tests, records in tmp_path, no env overrides."""
    monkeypatch.delenv("LANGFIELD_SKIP_SELFTEST", raising=False)
    monkeypatch.delenv("LANGFIELD_FORCE_SELFTEST", raising=False)
    monkeypatch.setattr(st, "record_path", lambda kind, device: tmp_path / f"selftest-{kind}.json")
    st.clear_cache()
    yield
    st.clear_cache()


cpu_render = functools.partial(rasterization, backend="cpu")


def offset_renders(**kw):
    out, alpha, meta = cpu_render(**kw)
    return out + 1e-3, alpha, meta


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


def wrong_means_grad(**kw):  # forward exact, gradient of the means 1% off
    return cpu_render(**{**kw, "means": _ScaleGrad.apply(kw["means"], 1.01)})


def test_cpu_backend_passes_with_margin():
    res = st.selftest("cpu", "cpu")
    assert res.passed and res.exception is None, res.summary()
    for case in ("sh3", "features"):
        for q in ("renders", "alphas", "radii", "grad_means", "grad_quats", "grad_scales", "grad_opacities",
                  "grad_colors", "grad_backgrounds", "grad_viewmats"):
            assert f"{case}/{q}" in res.errors, (case, q)
    assert "features/grad_features" in res.errors
    assert res.errors["sh3/radii"][0] == 0.0
    # measured here: the worst quantity is ~16x inside its tolerance
    assert max(e / t for e, t in res.errors.values()) < 0.25
    assert res.library is not None and Path(res.library).exists()


def test_forward_mismatch_fails_and_names_renders():
    res = st.selftest("cpu", "cpu", render_fn=offset_renders)
    assert not res.passed
    assert res.worst.endswith("/renders") and res.error == pytest.approx(1e-3, rel=0.05)
    assert res.errors["sh3/alphas"][0] <= res.errors["sh3/alphas"][1]  # only the renders were touched


def test_backward_mismatch_fails_and_names_the_gradient():
    res = st.selftest("cpu", "cpu", render_fn=wrong_means_grad)
    assert not res.passed
    assert res.worst.endswith("/grad_means"), res.summary()
    bad = [k for k, (e, t) in res.errors.items() if e > t]
    assert bad and all(k.endswith("/grad_means") for k in bad), bad


def test_a_crashing_backend_is_a_failed_result():
    def boom(**kw):
        raise RuntimeError("illegal memory access\nmore lines")

    res = st.selftest("cpu", "cpu", render_fn=boom)
    assert not res.passed and res.worst == "exception"
    assert res.exception == "RuntimeError: illegal memory access"


def test_failure_warns_once_is_recorded_and_auto_falls_back(tmp_path, monkeypatch):
    assert resolve_backend("auto", CPU, torch.float32) == "cpu"  # nothing recorded yet
    st.clear_cache()
    with pytest.warns(RuntimeWarning, match=r"FAILED its self-test on cpu: \w+/renders differs .* by 0.00\d+ \(tolerance"):
        res = st.ensure_selftest("cpu", CPU, run=True, render_fn=offset_renders)
    assert not res.passed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert st.ensure_selftest("cpu", CPU) is res
        assert resolve_backend("auto", CPU, torch.float32) == "torch"
    assert resolve_backend("cpu", CPU, torch.float32) == "cpu"  # explicit: still the native backend
    from langfield.render.synthetic import random_scene

    p = random_scene(30, C=1, width=16, height=12).params()
    assert rasterization(**p)[2]["backend"] == "torch"
    assert rasterization(**p, backend="cpu")[2]["backend"] == "cpu"

    rec = json.loads((tmp_path / "selftest-cpu.json").read_text())
    assert rec["passed"] is False and rec["worst"] == res.worst and rec["kind"] == "cpu"

    # the next process: the record is read, the test is not run again, the warning comes once
    st.clear_cache()
    monkeypatch.setattr(st, "selftest", lambda *a, **k: pytest.fail("self-test re-run despite a record"))
    with pytest.warns(RuntimeWarning, match="FAILED its self-test"):
        assert resolve_backend("auto", CPU, torch.float32) == "torch"
    assert st._results[("cpu", "cpu")].source == "record"
    monkeypatch.undo()
    monkeypatch.setattr(st, "record_path", lambda kind, device: tmp_path / f"selftest-{kind}.json")

    # forced: runs again (the real backend passes), the record is replaced, auto is native again
    monkeypatch.setenv("LANGFIELD_FORCE_SELFTEST", "1")
    st.clear_cache()
    assert st.ensure_selftest("cpu", CPU, run=True).passed
    monkeypatch.delenv("LANGFIELD_FORCE_SELFTEST")
    assert resolve_backend("auto", CPU, torch.float32) == "cpu"
    assert json.loads((tmp_path / "selftest-cpu.json").read_text())["passed"] is True


def test_skip_env_ignores_a_failed_record(tmp_path, monkeypatch):
    with pytest.warns(RuntimeWarning):
        st.ensure_selftest("cpu", CPU, run=True, render_fn=offset_renders)
    st.clear_cache()
    monkeypatch.setenv("LANGFIELD_SKIP_SELFTEST", "1")
    assert st.ensure_selftest("cpu", CPU, run=True) is None
    assert resolve_backend("auto", CPU, torch.float32) == "cpu"


def test_cpu_auto_never_runs_the_test_and_looks_up_once(monkeypatch):
    calls = []
    real = st.ensure_selftest
    monkeypatch.setattr(st, "selftest", lambda *a, **k: pytest.fail("CPU self-test run automatically"))
    monkeypatch.setattr(st, "ensure_selftest", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(5):
        assert resolve_backend("auto", CPU, torch.float32) == "cpu"
    assert len(calls) == 1  # then a dict lookup per call


def test_corrupt_or_foreign_record_is_ignored(tmp_path):
    path = tmp_path / "selftest-cpu.json"
    for text in ("{not json", json.dumps({"passed": False}), json.dumps([1, 2])):
        path.write_text(text)
        st.clear_cache()
        assert st.ensure_selftest("cpu", CPU) is None  # not run for the CPU, record unusable
        assert resolve_backend("auto", CPU, torch.float32) == "cpu"


def test_result_json_round_trip():
    res = st.selftest("cpu", "cpu", render_fn=offset_renders)
    back = st.SelftestResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back.passed == res.passed and back.worst == res.worst and back.errors == res.errors
    crash = st.SelftestResult("cuda", "cuda:0", "x", False, "exception", float("inf"), 0.0, exception="E")
    assert st.SelftestResult.from_json(json.loads(json.dumps(crash.to_json()))).error == 1e30


def test_fallback_on_cpu_is_torch_and_gsplat_needs_cuda():
    assert not st.gsplat_ready(CPU)
    assert st.fallback_backend(CPU) == "torch"
    assert st.fallback_backend(CPU, needs_features=True) == "torch"


def test_cli_build_says_when_no_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.cli_build(cuda=False) == 0
    assert "[cuda] no CUDA device: self-test not run" in capsys.readouterr().out


# ------------------------------------------------------------------ build cache key
def test_cpu_feature_flags_are_in_the_cache_key():
    cmd = _build._commands("cpu", Path("x.so"))[0]
    assert "-march=native" in cmd
    avx2 = "fpu sse sse2 avx avx2 fma"
    k1 = _build._key("cpu", cmd, cpu_flags=avx2)
    k2 = _build._key("cpu", cmd, cpu_flags=avx2 + " avx512f avx512bw")
    assert k1 != k2 and len(k1) == len(k2) == 20
    assert _build._key("cpu", cmd, cpu_flags=avx2) == k1  # deterministic
    # a build without -march=native does not depend on the flags
    generic = [c for c in cmd if c != "-march=native"]
    assert _build._key("cpu", generic, cpu_flags=avx2) == _build._key("cpu", generic, cpu_flags=avx2 + " avx512f")
    # the default uses this machine's flags
    assert _build._key("cpu", cmd) == _build._key("cpu", cmd, cpu_flags=_build.cpu_features())


def test_cpu_features_parsing():
    x86 = "processor\t: 0\nmodel name\t: X\nflags\t\t: sse2 avx2 fma avx2\n\nprocessor\t: 1\nflags\t\t: sse2\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
    assert _build._parse_cpu_features(x86) == "avx2 fma sse2"  # first processor, sorted, unique
    assert _build._parse_cpu_features(arm) == "asimd fp sve"
    assert _build._parse_cpu_features("model name: X\n") == ""
    if Path("/proc/cpuinfo").exists():
        assert _build.cpu_features()  # this Linux machine has flags


def test_auto_on_cuda_after_a_failed_selftest_picks_gsplat_or_torch(monkeypatch):
    """The CUDA branch of resolve_backend, with the device and the self-test faked (runs without a GPU)."""
    import langfield.render._build as b

    dev = torch.device("cuda", 0)
    bad = st.SelftestResult("cuda", "cuda:0", "Fake GPU (sm_90)", False, "sh3/grad_means", 0.5, 0.01)
    good = st.SelftestResult("cuda", "cuda:0", "Fake GPU (sm_90)", True, "sh3/renders", 1e-6, 1e-4)
    monkeypatch.setattr(b, "native_available", lambda kind, warn=True: True)
    monkeypatch.setattr(st, "ensure_selftest", lambda kind, device, **k: bad)
    monkeypatch.setattr(st, "gsplat_ready", lambda device: True)
    assert resolve_backend("auto", dev, torch.float32) == "gsplat"
    assert resolve_backend("auto", dev, torch.float32, needs_features=True) == "torch"  # gsplat has no features=
    monkeypatch.setattr(st, "gsplat_ready", lambda device: False)
    assert resolve_backend("auto", dev, torch.float32) == "torch"
    monkeypatch.setattr(st, "ensure_selftest", lambda kind, device, **k: good)
    assert resolve_backend("auto", dev, torch.float32) == "cuda"
    monkeypatch.setattr(st, "ensure_selftest", lambda kind, device, **k: None)  # skipped
    assert resolve_backend("auto", dev, torch.float32) == "cuda"
    assert resolve_backend("auto", dev, torch.float64) == "torch"
