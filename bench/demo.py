"""End-to-end ``langfield demo`` on the CPU: time per stage and the query metrics it reaches.

    python bench/demo.py                       # the demo's defaults (64 views, 256x256, 2000 + 1500 steps)
    python bench/demo.py --size 128x128 --steps 1000 --lang-steps 800

Each stage is timed in this process (scene rendering, RGB training, language stage +
evaluation); the language stage's share is also given as a ratio to the RGB stage measured in the
same run, which is stable across machines of different speed. Results go to
bench/results/demo.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lang-steps", type=int, default=1500)
    ap.add_argument("--out", default=None, help="keep the demo here (default: a temporary folder)")
    a = ap.parse_args()
    from langfield.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "demo"
        s = run_demo(out, steps=a.steps, lang_steps=a.lang_steps, views=a.views, size=a.size, device="cpu",
                     text_encoder="offline", quiet=True, log=lambda *_: None)
    t = s["timings"]
    lang = s["language"]
    rows = [{"size": a.size, "views": a.views, "steps": f"{a.steps}+{a.lang_steps}",
             "scene s": t["scene_s"], "RGB s": t["rgb_s"], "language+eval s": t["language_and_eval_s"],
             "total s": t["total_s"], "lang/RGB": t["language_and_eval_s"] / max(t["rgb_s"], 1e-9),
             "PSNR": s["rgb"]["psnr"], "mIoU": lang["miou"], "loc": lang["loc"], "mIoU 3D": lang["miou_3d"]}]
    print_table(rows, list(rows[0]))
    write_json(Path(__file__).resolve().parent / "results" / "demo.json",
               {"machine": machine(), "args": vars(a), "summary": s, "rows": rows})


if __name__ == "__main__":
    main()
