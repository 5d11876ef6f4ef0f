"""How the command-line tools (train.py, score.py, export.py, python -m pipeline.prepare) start and end: the flag
parser, the exit statuses, SIGTERM as an exception, and `run_cli`, which turns a project error into one line.

Library code raises `OdirError`; only this module's `run_cli` (called by the scripts' entry points) turns it into an
exit status.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
from pathlib import Path

from odir_dual.common.errors import OdirError, one_line, printable

# The command-line tools end with one of these; docs/data.md, "Exit statuses", documents them.
EXIT_OK = 0
EXIT_BAD_INPUT = 1  # bad data, sheet, model, checkpoint, path, permissions, full disk: one line naming it
EXIT_USAGE = 2  # a bad command line (argparse's own status)
EXIT_SIGINT = 130  # stopped by Ctrl-C (128 + SIGINT, the shell's convention); what was finished is kept
EXIT_SIGTERM = 143  # stopped by SIGTERM (128 + SIGTERM)


class UsageError(OdirError, ValueError):
    """A bad command line, worded as the tools word it (what was wrong, the closest flag, where --help is); raised
    by an `ArgParser(raises=True)`. `run_cli` prints it as it is and ends with EXIT_USAGE."""


class NothingToRun(OdirError):
    """The command line asked only for something printed (--help, --print-config), which is printed: there is
    nothing to run. An exception so that a library call (`parse_config(["--help"])` in a notebook) keeps its
    process; `run_cli` ends with EXIT_OK."""


class Terminated(BaseException):
    """SIGTERM as an exception, so that `finally` blocks and `atomic_write` clean up as for Ctrl-C.

    A BaseException, like KeyboardInterrupt (and not an OdirError): `except Exception` must not swallow it."""


def _raise_terminated(signum, frame):
    raise Terminated


def signal_name(signum: int) -> str:
    """"SIGINT (Ctrl-C)" or "SIGTERM" (any other signal by its name)."""
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def run_cli(main, prog: str, interrupted: str = "") -> int:
    """Run a tool's `main()` and turn its ending into an exit status and at most one line on stderr.

    Args:
        main: the tool's main(); returns None or an exit status.
        prog: the tool's name in messages ("score.py").
        interrupted: what the user should know after a Ctrl-C / SIGTERM (what was kept, how to go on).

    A project error (`OdirError`) or an OSError is printed as "prog: error: <message>", status EXIT_BAD_INPUT; a
    `UsageError` as it is, EXIT_USAGE; `NothingToRun` ends with EXIT_OK.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main() or EXIT_OK
    except NothingToRun:
        return EXIT_OK
    except UsageError as e:
        sys.stderr.write(printable(str(e)) + "\n")
        return EXIT_USAGE
    except (OSError, OdirError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Terminated) as e:
        name = "SIGINT (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        print(f"\n{prog}: stopped by {name}" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return EXIT_SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def shell_path(path) -> str:
    """A path as a command line the user can paste: relative to the working directory when inside it, else
    absolute; quoted for the shell when needed."""
    path = Path(os.path.abspath(path))
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


def tool_command(name: str) -> str:
    """How to run the project's tool `name` (export, score, train) from here: the interpreter running now and the
    script beside this package (`.venv/bin/python score.py`), or `odir-score` when run as an installed command."""
    if Path(sys.argv[0]).name.startswith("odir-"):
        return f"odir-{name}"
    return f"{shell_path(sys.executable)} {shell_path(Path(__file__).resolve().parents[1] / f'{name}.py')}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as wide as the terminal up to 110 columns. Descriptions keep their own line breaks, except that a line
    wider than the help is wrapped (a docstring used as the description is written for 120 columns)."""

    def __init__(self, prog, **kwargs):
        width = min(110, shutil.get_terminal_size((110, 24)).columns) - 2
        super().__init__(prog, max_help_position=32, width=width)

    def _fill_text(self, text, width, indent):
        return _rewrap(super()._fill_text(text, width, indent), width)


def _rewrap(text: str, width: int) -> str:
    """Each paragraph that has a line wider than `width` refilled to `width`; paragraphs with indented lines
    (commands, examples) are left as they are."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if max(map(len, lines)) <= width or any(line.startswith(" ") for line in lines):
            out.append(para)
        else:
            out.append(textwrap.fill(" ".join(lines), width, break_on_hyphens=False, break_long_words=False))
    return "\n\n".join(out)


class ArgParser(argparse.ArgumentParser):
    """argparse for the tools: no abbreviations (`--epoch` is not silently `--epochs`), and a bad command line is
    answered in a few lines: what was wrong, the closest flag ("did you mean --epochs?"), where to read more; not
    the whole usage.

    A script's own parser (the default) ends the process as argparse does: status 2 for a bad command line, 0
    after --help. `raises=True` (a parser inside a library function such as `parse_config`) raises `UsageError`
    and `NothingToRun` instead, which `run_cli` turns into the same text and statuses.
    """

    def __init__(self, *args, raises: bool = False, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.raises = raises

    def error(self, message):
        text = self.explain(message)
        if self.raises:
            raise UsageError(text)
        self.exit(EXIT_USAGE, printable(text) + "\n")  # argparse's own exit: this parser is a script's

    def exit(self, status=0, message=None):
        if not self.raises:
            super().exit(status, message)
        if message:  # argparse's exit prints its message too
            sys.stderr.write(printable(message))
        raise NothingToRun() if status == EXIT_OK else UsageError(message or f"{self.prog}: exit status {status}")

    def explain(self, message: str) -> str:
        """argparse's complaint as the few lines the user sees."""
        lines, tool = [], self.prog.split()[-1]  # "python score.py" → "score.py", as in run_cli's messages
        m = re.match(r"unrecognized arguments: (.*)", message)
        unknown = [w.split("=")[0] for w in m[1].split() if w.startswith("-")] if m else []
        flags = [o for o in self._option_string_actions if o.startswith("--")]
        for flag in unknown:
            close = [o for o in flags if o.startswith(flag)][:2] or difflib.get_close_matches(flag, flags, n=2,
                                                                                                cutoff=0.6)
            lines.append(f"{tool}: error: unknown flag {flag}" + (f"; did you mean {' or '.join(close)}?" if close
                                                                  else ""))
        if not unknown:
            lines.append(f"{tool}: error: {message}")
        command = f"python {self.prog}" if self.prog.endswith(".py") and " " not in self.prog else self.prog
        if self.usage:
            lines.append(f"usage: {self.format_usage().split(':', 1)[1].strip()}")
        lines.append(f"{command} --help lists every flag")
        return "\n".join(lines)
