"""The project's one error family, and how an error reads on one line.

Library functions raise subclasses of `OdirError` with a one-line message naming the file, row or flag; only the
command-line entry points (`common.cli.run_cli`) turn them into that line and an exit status. A notebook that
imports the package catches `OdirError` and keeps its process.
"""
from __future__ import annotations


class OdirError(Exception):
    """The base of every error this project raises on purpose (bad data, sheet, checkpoint, model file, flag,
    output path, ...). Library functions raise it; only entry points turn it into a line + exit status.

    Subclasses keep a second base where callers already catch one (`ValueError`, `RuntimeError`)."""


def one_line(e: BaseException) -> str:
    """An exception as one printable line: its message (OSError: strerror and file name), odd bytes escaped."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    else:
        text = str(e) or type(e).__name__
    return printable(" ".join(text.split()))


def printable(text: str) -> str:
    """`text` safe to print or write as UTF-8: a file name's undecodable bytes (surrogate escapes) as \\xNN."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
