"""`align ARGS` called in the test's own process, read as a test reads `python -m align ARGS`: its exit code,
stdout and stderr. For the tests about a command's words and exit code, not about a process boundary
(a launch's ranks, signals, a fresh interpreter's finalisation): a subprocess spends seconds importing
torch and transformers that this process has already imported.

What a fresh process would also write on stderr is written there here too, so that "exactly one line, no
traceback" still holds or fails as it would: the progress lines `configure_logging` sends there (under
pytest the root logger already has pytest's handlers, so its basicConfig adds none) and Python warnings
(which pytest would otherwise record)."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import warnings

from align.commands.cli import main


def run_align_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """(returncode, stdout, stderr) of `align ARGS`, as subprocess.run(..., capture_output=True, text=True) gives."""
    gc.collect()  # an earlier test's garbage warns now (an unclosed file's ResourceWarning), not on this stderr
    capsys.readouterr()  # only this command's words
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # pytest's captured stderr, as configure_logging's would be
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():  # main's filters and a fresh interpreter's defaults, undone after
            warnings.resetwarnings()
            warnings.simplefilter("default")
            warnings.showwarning = _warn_on_stderr
            code = _exit_code(list(args))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["align", *args], code, out.out, out.err)


def _exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:  # main always exits; a string code is printed on stderr, as sys.exit does
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        return exc.code or 0
    raise AssertionError("align's main returned without exiting")


def _warn_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
