"""The wheel must carry every package and every native source (not only an editable install)."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    cfg = _pyproject()["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    found = set()
    for init in (ROOT / "langfield").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        found.add(".".join(rel.parts))
    missing = found - listed
    assert not missing, f"add to [tool.setuptools] packages: {sorted(missing)}"
    for pkg in listed:
        folder = ROOT / dirs.get(pkg, pkg.replace(".", "/"))
        if pkg == "langfield.csrc":  # data only, no __init__.py (it must not shadow NVIDIA's `cuda`)
            assert folder.is_dir() and not (folder / "__init__.py").exists()
            continue
        assert (folder / "__init__.py").exists(), f"{pkg}: {folder} has no __init__.py"


def test_native_sources_are_package_data():
    cfg = _pyproject()["tool"]["setuptools"]
    patterns = cfg["package-data"]["langfield.csrc"]
    cuda = ROOT / cfg["package-dir"]["langfield.csrc"]
    for f in cuda.rglob("*"):
        if f.is_dir() or "__pycache__" in f.parts or f.suffix == ".py":
            continue
        rel = f.relative_to(cuda).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not shipped: extend package-data"


def test_source_dir_is_found():
    from langfield.render._build import source_dir

    assert (source_dir() / "include" / "langfield_abi.h").exists()
