"""Progress of long loops: a tqdm bar on a terminal, a plain line every few seconds otherwise.

With its output going to a log file (nohup, a cluster job, CI) a bar prints nothing useful, so
:class:`Progress` then writes one line every ``every_s`` seconds (default 10) with the step,
the figures the caller passes (loss, PSNR, Gaussians, ...), steps/s and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, TextIO

__all__ = ["Progress", "format_seconds", "progress_mode"]


def progress_mode(progress) -> Optional[str]:
    """A ``progress`` option -> :class:`Progress` mode: None = a bar on a terminal, plain lines
    otherwise; True = a bar; False = nothing; a mode string as it is."""
    if progress is None or isinstance(progress, str):
        return progress
    return "bar" if progress else "off"


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """``Progress(total, initial, desc, mode)``; ``mode``: ``"bar"``, ``"log"``, ``"off"`` or
    None (a bar when stderr is a terminal, else log lines)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step",
                 mode: Optional[str] = None, every_s: float = 10.0, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        if mode is None:
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.total, self.n, self.desc, self.unit = int(total), int(initial), desc, unit
        self.every_s = float(every_s)
        self.t0 = time.perf_counter()
        self.n0 = self.n
        self.last = self.t0
        self.post: Dict[str, Any] = {}
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=desc, smoothing=0.05,
                            file=self.stream)

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def update(self, k: int = 1, **figures: Any) -> None:
        self.n += k
        if figures:
            self.post.update(figures)
        if self.bar is not None:
            self.bar.update(k)
            if figures:
                self.bar.set_postfix({a: _fmt(b) for a, b in self.post.items()}, refresh=False)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self.last >= self.every_s or self.n >= self.total:
                self.last = now
                self.stream.write(self.line(now) + "\n")
                self.stream.flush()

    def set(self, **figures: Any) -> None:
        self.post.update(figures)
        if self.bar is not None:
            self.bar.set_postfix({a: _fmt(b) for a, b in self.post.items()}, refresh=False)

    def line(self, now: Optional[float] = None) -> str:
        now = time.perf_counter() if now is None else now
        dt = max(now - self.t0, 1e-9)
        rate = (self.n - self.n0) / dt
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        figs = " ".join(f"{a} {_fmt(b)}" for a, b in self.post.items())
        eta = format_seconds(left) if left == left else "?"
        return (f"[{self.desc}] {self.unit} {self.n}/{self.total} ({100.0 * self.n / max(self.total, 1):.0f}%) "
                f"{figs}{' ' if figs else ''}{rate:.2f} {self.unit}s/s, {format_seconds(dt)} elapsed, {eta} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)
