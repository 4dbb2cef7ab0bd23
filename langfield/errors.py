"""User-facing errors of the commands: one line on stderr, exit status 2, no traceback.

Every verb raises :class:`CliError` for bad input (``fail(msg)`` prefixes ``langfield:``);
:func:`os_reason` / :func:`os_path` turn an ``OSError`` into words and the file it is really
about (the target of an atomic write, not its temporary file); :func:`plain_warnings` prints
warnings as one line each when a command runs as ``langfield``.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

__all__ = ["CliError", "fail", "os_reason", "os_path", "plain_warnings"]


class CliError(SystemExit):
    """A one-line user error of a command: printed to stderr at once, exit status 2 (as argument
    errors); ``str(error)`` is the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message
        print(message, file=sys.stderr)

    def __str__(self) -> str:
        return self.message


def fail(msg: str) -> CliError:
    """``raise fail("...")``: the message prefixed with ``langfield:``."""
    return CliError(f"langfield: {msg}")


def os_reason(e: OSError) -> str:
    """An OSError's reason in words, without Python's prefix: "No space left on device"."""
    import errno

    if e.errno == errno.EFBIG:
        return "file too large: the file size limit or the disk is full"
    return e.strerror or str(e) or type(e).__name__


def os_path(e: OSError, default) -> Path:
    """The file an OSError is about: the target of an atomic write rather than its temporary
    file (``.config.json.k2j3.tmp`` -> ``config.json``), else ``default``."""
    if not e.filename:
        return Path(default)
    f = Path(str(e.filename))
    m = re.match(r"^\.(.+)\.[A-Za-z0-9_]+\.tmp$", f.name)
    return f.with_name(m.group(1)) if m else f


def plain_warnings() -> None:
    """Warnings as one line each (``langfield: warning: ...``), not Python's two-line format
    with a source line: a user reads them, not a developer. Set for the rest of the process
    when a command runs as ``langfield`` (not when a test calls the function)."""
    if Path(sys.argv[0]).name not in ("langfield", "cli.py", "__main__.py"):
        return

    def fmt(message, category, filename, lineno, line=None):
        return f"langfield: warning: {message}\n"

    warnings.formatwarning = fmt
