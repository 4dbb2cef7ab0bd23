"""The adversarial sweep's pytest wrapper: ``scripts/adversarial.py --subset quick`` (the CLI as a
subprocess on broken inputs: one-line errors with exit status 2, warnings with correct output,
no traceback, no input changed). The full sweep (every #12 case: read-only folders, a full
disk, damaged checkpoints for resume/eval/query/view, two writers of one run) is
``python scripts/adversarial.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "adversarial.py"


def _rows(stdout: str):
    return [ln.split()[:2] for ln in stdout.splitlines() if ln.split()[1:2] in (["ok"], ["FAIL"], ["KNOWN"])]


@pytest.mark.slow
def test_adversarial_quick_subset():
    r = subprocess.run([sys.executable, str(SCRIPT), "--subset", "quick"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = _rows(r.stdout)
    assert len(rows) >= 8 and all(status == "ok" for _, status in rows), r.stdout


def test_sweep_covers_every_issue_12_case():
    """Every item of issue #12 that a user can reach from the CLI has a case (by name)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import adversarial
    finally:
        sys.path.remove(str(SCRIPT.parent))
    names = {c.name for c in adversarial.CASES}
    assert len(names) == len(adversarial.CASES)  # unique names
    for needed in ("scenes-make-over-existing", "train-two-writers-one-folder", "query-ply-exists",
                   "train-resume-damaged-newest", "eval-damaged-newest-language", "query-damaged-newest-language",
                   "view-damaged-newest-language", "extract-damaged-cache-entry", "query-threshold-nan",
                   "train-test-every-negative", "query-ply-orbit-views", "train-bad-images",
                   "train-heldout-jpeg-truncated", "train-heldout-jpeg-skipped", "query-10000-chars",
                   "train-out-in-read-only-folder", "train-resume-read-only-run", "train-resume-full-disk",
                   "render-out-is-a-file", "query-out-is-a-file", "query-ply-is-a-folder",
                   "train-labels-without-label-maps", "extract-labels-without-label-maps", "train-latent-dim-0",
                   "scenes-make-size-1x1", "train-init-ply-nan"):
        assert needed in names, needed
    quick = [c for c in adversarial.CASES if c.quick]
    assert 8 <= len(quick) <= 12 and not any(c.serve or c.wrap for c in quick)


def test_fsize_wrapper_fails_writes_with_efbig(tmp_path):
    """The full-disk simulation the sweep uses: a write past the limit fails (EFBIG), no signal."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import adversarial
    finally:
        sys.path.remove(str(SCRIPT.parent))
    argv = adversarial.command(["--version"], "fsize:1000")
    code = argv[2].replace("from langfield.cli import main\nsys.exit(main(sys.argv[2:]))",
                           "import os\nfd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT)\n"
                           "while True: os.write(fd, b'x' * 600)")
    r = subprocess.run([sys.executable, "-c", code, "1000", str(tmp_path / "f")], capture_output=True, text=True)
    assert r.returncode == 1 and "File too large" in r.stderr, r.stderr
    assert (tmp_path / "f").stat().st_size == 1000
