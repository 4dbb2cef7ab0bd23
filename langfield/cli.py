"""``langfield <verb> [subverb] ...``: a thin layer over the library.

Each command is a plain function whose typed signature tyro turns into flags;
the implementation module is imported only when its command runs, so
``langfield --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Dict, Tuple, Union

from langfield.errors import CliError  # noqa: E402,F401  (re-exported: every verb raises it)

# verb -> (module, function) or {subverb: (module, function)}
Target = Tuple[str, str]
COMMANDS: Dict[str, Union[Target, Dict[str, Target]]] = {
    "build": ("langfield.render._build", "cli_build"),
    "process": ("langfield.data.process", "cli_process"),
    "train": ("langfield.train.cli", "cli_train"),
    "render": ("langfield.train.cli", "cli_render"),
    "eval": ("langfield.train.cli", "cli_eval"),
    "export": ("langfield.train.cli", "cli_export"),
    "extract": ("langfield.features.cli", "cli_extract"),
    "query": ("langfield.query_cli", "cli_query"),
    "demo": ("langfield.demo", "cli_demo"),
    "view": ("langfield.viewer.app", "cli_view"),
    "slam": ("langfield.slam.cli", "cli_slam"),
    "scenes": {
        "list": ("langfield.scenes.cli", "scenes_list"),
        "make": ("langfield.scenes.cli", "scenes_make"),
    },
}

HELP = {
    "build": "build the native renderer ahead of time (CPU; CUDA too when nvcc is found)",
    "process": "structure from motion (pycolmap) on a folder of images without poses -> a COLMAP dataset",
    "demo": "the whole pipeline on the built-in tabletop scene, offline, in a few minutes on a CPU",
    "train": "train a Gaussian scene (and with --features its language field) on a dataset",
    "render": "render a trained run's views (held-out by default)",
    "eval": "PSNR/SSIM on held-out views and text queries (LERF-ovs protocol, 3D selection) -> metrics.json",
    "query": "text queries on a language field: heatmaps, masks, 3D selection",
    "view": "browser viewer (viser): RGB, depth, language PCA, query heatmaps/masks, 3D selection; follows a training run",
    "export": "export a trained run as a standard 3DGS PLY (with lang_* properties when present)",
    "extract": "2D language features per image (sam-clip | dense-clip | labels) into a resumable cache",
    "slam": "online RGB-D mapping: track and map a TUM/Replica/7-Scenes/folder sequence into a run (+ language)",
    "scenes": "procedural scenes with exact ground truth: list, make",
}


def _usage() -> str:
    lines = ["usage: langfield <command> [args]", "", "commands:"]
    for verb, target in COMMANDS.items():
        if isinstance(target, dict):
            lines.append(f"  {verb} {{{','.join(target)}}}  {HELP.get(verb, '')}")
        else:
            lines.append(f"  {verb:<12}{HELP.get(verb, '')}")
    lines.append("")
    lines.append("`langfield <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "version"):
        from langfield import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"langfield: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[verb]
    prog = f"langfield {verb}"
    if isinstance(target, dict):
        if not rest or rest[0] not in target:
            print(f"usage: langfield {verb} {{{','.join(target)}}} [args]", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        prog = f"{prog} {rest[0]}"
        target, rest = target[rest[0]], rest[1:]
    module, func = target
    import tyro

    fn = getattr(importlib.import_module(module), func)
    result = tyro.cli(fn, args=rest, prog=prog)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
