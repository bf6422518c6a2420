"""The `align` command run in this process, as a test reads it: its exit code and what it printed."""

from __future__ import annotations

from align.commands.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `align ARGV`."""
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code or 0
    else:
        code = 0
    out = capsys.readouterr()
    return code, out.out + out.err
