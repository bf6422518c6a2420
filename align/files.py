"""Reading a user's input files: one line naming the file and what is wrong with it (not found, a
folder, not UTF-8, not JSON, a damaged gzip), never a traceback. The data formats built on these
readers are align.formats."""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import UserError


def _open_text(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open("r", encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not data


class _NotJson(ValueError):
    pass


class _RepeatedKey(ValueError):
    pass


def _refuse_constant(name: str) -> None:
    # Python's json module reads NaN and Infinity, which JSON does not have: the data is refused here
    # rather than carried into files other readers cannot parse
    raise _NotJson(f"{name} is not a JSON value")


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Python's json module keeps the last of a repeated key without a word: a record with two
    # "ranks" (a merge gone wrong) would train on one of them silently
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _RepeatedKey(f"the key {repeated!r} appears twice in one object; keep the one that is meant")
    return record


def input_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as an input file, in the words every command uses ("file not
    found: X", "X is a directory, not a file"); None when it is a file."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return f"{path} is a directory, not a file"
    return f"file not found: {path}" if not path.exists() else f"{path} is not a file"



def check_output_file(out: Path, force: bool, option: str = "--out") -> None:
    """`out` as a file a command writes whole (a temporary file renamed over it): a new path, or
    with `force` a regular file to replace. A link, a device or a pipe is refused even with `force`:
    the rename would put a plain file in its place (/dev/stdout, a link into another folder) and
    nothing would reach what it named."""
    if out.is_symlink():
        raise UserError(f"{option} {out} is a symbolic link (to {out.resolve()}); give the file's own path")
    if out.exists() and not out.is_file():
        raise UserError(f"{option} {out} is not a regular file (a device, a pipe or a socket); give a file's path")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another {option} or pass --force to replace it")

def jsonl_rows(path: str | Path):
    """Yield (lineno, parsed JSON) for each non-blank line; .gz files are read transparently."""
    import gzip
    import zlib

    path = Path(path)
    problem = input_file_problem(path)
    if problem:
        raise UserError(problem)
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line, parse_constant=_refuse_constant, object_pairs_hook=_refuse_repeated_keys)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                except _NotJson as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                except _RepeatedKey as exc:
                    raise UserError(f"{path}:{lineno}: {exc}") from None
                except ValueError:  # Python's limit on an integer's digits (4300), not JSON's
                    raise UserError(f"{path}:{lineno}: not valid JSON (a number too long to read)") from None
                except RecursionError:
                    raise UserError(f"{path}:{lineno}: not valid JSON (nested too deep to read)") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (a binary file?)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(f"{path}: damaged or truncated gzip file ({exc or type(exc).__name__})") from None
    except OSError as exc:  # no permission to read it, or the disk's own error
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content, or one line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (a binary file?)") from None
    except OSError as exc:  # no permission to read it, or the disk's own error
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
