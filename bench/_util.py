"""Small helpers shared by the benchmarks: timing and table/JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs, in seconds."""
    for _ in range(warmup):
        fn()
        sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)  # the least disturbed run: these machines are shared and noisy


def machine() -> Dict[str, object]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def print_table(rows: List[Dict[str, object]], cols: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: Path, payload: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
