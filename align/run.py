"""Run directories: the resolved config, `metrics.jsonl`, `summary.json`, atomic writes.

Every training stage writes the same layout, so tools (and `align export`) can read any run:

    RUN/config.yaml      the resolved config, exactly as used
    RUN/metrics.jsonl    one JSON object per logged step, flushed as it is written
    RUN/summary.json     final metrics, written atomically at the end
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from align.config import config_yaml
from align.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# the `overwrite` key of every training stage (align.checkpoint.check_run_dir)
OVERWRITE_HELP = (
    "Start a fresh run in an output_dir that holds an earlier run of this stage: its checkpoints and outputs are "
    "removed once the new run has loaded (other files stay; another stage's run, a folder holding files of a run's "
    "names but no run's config.yaml, and a run reading a model or file from what would be removed, are refused).")



def replaceable_folder(out: Path, made_here: Callable[[Path], bool]) -> bool:
    """Whether --force may replace `out`: an empty folder, or one `made_here` recognises as the
    command's own earlier output; never a file in the way, or anyone else's folder. A link is one
    line of its own (the replacement would take the link's place, not its target's)."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link (to {out.resolve()}); give the folder's own path")
    if not out.is_dir():
        return False
    try:
        return not any(out.iterdir()) or made_here(out)
    except OSError:
        return False

def peak_memory_mb() -> float:
    """Peak resident memory of this process, in MiB: Linux's VmHWM (the high-water mark of this
    program's own address space). ru_maxrss is the fallback elsewhere; on Linux it also counts the
    resident memory of the parent this process was forked from, kept across exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_metrics(training: Mapping[str, float]) -> dict[str, float]:
    """A stage summary's memory figures: the peak resident memory of the run (`training`: its
    TrainingClock's state, a resumed run's earlier processes included) and, on a GPU, this process's
    peak of allocated GPU memory (PyTorch's caching allocator; not carried across a resume)."""
    import torch

    figures = {"memory/peak_rss_mb": max(training["peak_rss_mb"], peak_memory_mb())}
    if torch.cuda.is_available():
        figures["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


class TrainingClock:
    """A run's training time (wall and CPU seconds) and peak memory over all its processes: a resumed
    run starts from what its checkpoint recorded (`state`, `load_state_dict`), so that its summary
    gives the whole run's figures, not the last process's. The time of steps trained after the last
    checkpoint by a process that was stopped is not counted: those steps ran again."""

    def __init__(self) -> None:
        self.before = {"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mb": 0.0}
        self.start()

    def start(self) -> None:
        import time

        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def state_dict(self) -> dict[str, float]:
        """The run's figures so far (CPU time: all threads of this process)."""
        import time

        return {"seconds": self.before["seconds"] + time.perf_counter() - self.wall_start,
                "cpu_seconds": self.before["cpu_seconds"] + time.process_time() - self.cpu_start,
                "peak_rss_mb": max(self.before["peak_rss_mb"], peak_memory_mb())}

    def load_state_dict(self, state: Mapping[str, float] | None) -> None:
        """A checkpoint's figures (none in one written before they were recorded: from 0)."""
        self.before.update(state or {})


def make_directory(path: str | Path) -> Path:
    """`mkdir -p path`. The system's refusal (a file in the way, a broken link, no permission, a
    read-only disk) is the user's to fix: one line naming the path and the reason, no traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create directory {path}: {_refusal(path, exc)}") from None
    return path


def _refusal(path: Path, exc: OSError) -> str:
    """Why `path` cannot be created: the nearest part of it in the way, else the system's reason.
    (os.path's tests answer False where Path's raise, as for a name too long.)"""
    for part in (path, *path.parents):
        if os.path.islink(part) and not os.path.exists(part):
            return f"{part} is a broken symbolic link"
        if os.path.exists(part):
            return exc.strerror or str(exc) if os.path.isdir(part) else f"{part} is a file, not a directory"
    return exc.strerror or str(exc)


def prepare_run_dir(output_dir: str | Path, cfg: Any) -> Path:
    """Create the run directory and write the resolved config into it."""
    out = make_directory(output_dir)
    _write_atomic(out / CONFIG_FILE, lambda f: f.write(config_yaml(cfg)))  # a resume rewrites it: never half-written
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsWriter:
    """Appends one JSON line per call to RUN/metrics.jsonl and flushes it at once."""

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, metrics: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A run file (.json, or .yaml for a saved config) as a mapping; {} when missing or unreadable."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: json.JSONDecodeError, bad UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def process_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_ordinary_modes(root: str | Path) -> None:
    """The modes a plain mkdir and open would have given `root` and what is in it: 0777 for folders
    (and files with an execute bit), 0666 for other files, less the umask. Temporaries made with
    tempfile (mkdtemp, mkstemp, and safetensors' own) are owner-only: 0700 and 0600, which would leave
    an export or a checkpoint unreadable by another account (a server's). Links are left alone."""
    umask = process_umask()
    root = Path(root)

    def chmod(path: Path, executable: bool) -> None:
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)

    if root.is_symlink():
        return
    if not root.is_dir():
        chmod(root, bool(root.stat().st_mode & 0o111))
        return
    chmod(root, True)
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            item = Path(folder, name)
            if not item.is_symlink():
                chmod(item, item.is_dir() or bool(item.stat().st_mode & 0o111))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to a temporary file beside `path`, fsync it, then rename over `path` (with the mode
    a plain open would have given it, not the temporary's 0600)."""
    return _write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, default=_jsonable) + "\n"))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write one JSON object per line (non-ASCII text as it is), atomically as `write_json_atomic`;
    gzip-compressed where `path` is named .gz, as align.files.jsonl_rows reads it (plain text under
    that name was read back as a damaged gzip)."""
    lines = (json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n" for row in rows)
    if Path(path).suffix != ".gz":
        return _write_atomic(path, lambda f: f.writelines(lines))

    def write_gzip(f: Any) -> None:  # mtime 0: the same rows make the same bytes
        import gzip
        import io

        # closing the wrapper ends the gzip stream, not the temporary file, which is synced after this
        with io.TextIOWrapper(gzip.GzipFile(fileobj=f.buffer, mode="wb", mtime=0), encoding="utf-8") as text:
            text.writelines(lines)

    return _write_atomic(path, write_gzip)


def _write_atomic(path: str | Path, write: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        give_ordinary_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; rename it to `target` only on success.

    A crash or kill inside the block leaves `target` untouched (no half-written output):
    the temporary `.target.tmp-*` directory is removed on an exception, and one left by a
    SIGKILL is hidden and never mistaken for the real thing. `target` and what is in it get the
    modes a plain mkdir and open would have given them (give_ordinary_modes), not mkdtemp's 0700.
    """
    target = Path(target)
    make_directory(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:  # no permission, a read-only or full disk
        raise UserError(f"cannot create directory {target}: {exc.strerror or exc}") from None
    old = set_aside_name(target)
    try:
        yield tmp
        give_ordinary_modes(tmp)
        sync_tree(tmp)  # on the disk before its name is: a power cut after the rename leaves it whole
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            os.replace(target, old)
            os.replace(tmp, target)
            sync_directory(target.parent)
            remove_path(old)
        else:
            os.replace(tmp, target)
            sync_directory(target.parent)
    except BaseException as exc:
        full = not isinstance(exc, (OSError, KeyboardInterrupt)) and disk_all_but_full(tmp)
        if (old.exists() or old.is_symlink()) and not (target.exists() or target.is_symlink()):
            os.replace(old, target)  # stopped between the two renames: the earlier copy stays
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # torch's and safetensors' writers say it in their own words (torch: "unexpected pos")
            raise OSError(errno.ENOSPC, f"No space left on device ({exc})", str(target)) from exc
        raise


def sync_tree(root: Path) -> None:
    """Flush every file under `root`, and then its directories' entries, to the disk (fsync). torch's
    and safetensors' writers close their files without it, so a rename alone could publish a
    checkpoint whose files a power cut leaves empty."""
    for folder, _subfolders, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_directory(Path(folder))


def sync_directory(path: Path) -> None:
    """Flush a directory's entries (the names created or renamed in it) to the disk, where the file
    system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a directory (some network ones)
        pass
    finally:
        os.close(fd)


def disk_all_but_full(path: Path) -> bool:
    """Whether the file system holding `path` has less than 64 MiB left: where a write that failed
    without an OSError most likely failed for want of space."""
    try:
        return shutil.disk_usage(path).free < 64 * 2**20
    except OSError:
        return False


def set_aside_name(path: Path) -> Path:
    """The hidden name `path` takes while it is replaced or removed: `.NAME.old-PID`, which a run's
    start and an export clear where a stop left one."""
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def remove_path(path: Path) -> None:
    """Remove a directory tree, a file or a link, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_hidden_first(path: Path) -> None:
    """Remove directory `path` after renaming it to a hidden name, so that a stop half-way leaves no
    partial copy under its own name (a hidden one goes when the run next starts)."""
    hidden = set_aside_name(path)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
