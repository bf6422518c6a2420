"""Training checkpoints, the same for every stage that writes them (`align ppo`, `align dpo`,
`align reward train`):
everything a resumed run needs to continue bit for bit, written atomically.

    RUN/checkpoints/<prefix>-NNNNNN/  trainable.safetensors  optimizer.pt  scheduler.pt
                                      rng_states.pt (every process)  trainer_state.json
                                      (the stage's position in its run, the world size)

Under FSDP2 each rank holds a shard of the trained parameters and of their optimiser state, so
`trainable.safetensors` and `optimizer.pt` give way to `sharded/`, torch's distributed checkpoint
that every rank writes its part of (align.distributed.save_sharded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from align.distributed import processes_text
from align.errors import UserError
from align.provenance import matches_fingerprint
from align.run import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    atomic_directory,
    make_directory,
    prepare_run_dir,
    remove_hidden_first,
    remove_path,
    write_json_atomic,
)

log = logging.getLogger("align")

CHECKPOINTS_DIR = "checkpoints"
SHARDED_DIR = "sharded"  # a checkpoint's trained weights and optimiser state under FSDP2
STATE_FILE = "trainer_state.json"


def checkpoints(run_dir: Path, prefix: str) -> list[Path]:
    """RUN/checkpoints/<prefix>-NNNNNN, oldest first (a half-written one is hidden: align.run.atomic_directory)."""
    directory = run_dir / CHECKPOINTS_DIR
    return sorted(directory.glob(f"{prefix}-*")) if directory.is_dir() else []


def latest_checkpoint(run_dir: Path, prefix: str) -> Path | None:
    found = checkpoints(run_dir, prefix)
    return found[-1] if found else None


def data_fingerprint(items: Iterable[Any]) -> str:
    """sha256 of what a run trains on, in its order (each item's repr: token ids, pairs): a resumed
    run checks that its data are the checkpoint's (a file exported again, a database that grew)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} -> {"train.seed": 0}: a config's settings by their dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_run(path: Path, state: dict[str, Any], *, config: dict[str, Any], may_change: set[str],
                   data: str | None = None, num_steps: int | None = None, aliases: Mapping[str, str] | None = None,
                   models: Mapping[str, Path | None] | None = None) -> None:
    """A checkpoint resumes only the run that wrote it: the same settings (but for `may_change`, which
    leave the training as it is, and where the run lives), the same data, models (`align.provenance.model_fingerprints`)
    and planned steps (where the stage gives them). `models`: config key -> the model directory the run
    reads now (None: not checked), held to the checkpoint's fingerprints. `aliases`: the config class's former key names,
    which a checkpoint may hold."""
    if "config" not in state:  # written before checkpoints held their run's config: nothing to compare
        log.warning("%s holds no config to compare this run's with; resuming on the run's config.yaml", path)
        saved = now = {}
    else:
        saved = {(aliases or {}).get(key, key): value for key, value in flat_config(state["config"]).items()}
        now = flat_config(config)
    changed = [key for key in sorted(saved.keys() | now.keys())
               if saved.get(key) != now.get(key) and key not in may_change | {"output_dir", "overwrite"}]
    if changed:
        key = changed[0]
        raise UserError(f"{path}: {key} is {now.get(key)!r} where the run had {saved.get(key)!r}; it would change "
                        "the run: set it back in its config.yaml or start a new run")
    if data is not None and "data" in state and state["data"] != data:
        raise UserError(f"{path}: the training data differ from those the run was trained on (re-exported or "
                        "changed since); restore them or start a new run")
    saved_models = state.get("models", {})  # (older checkpoints: not kept)
    for key, model in (models or {}).items():
        if key in saved_models and model is not None and not matches_fingerprint(model, saved_models[key]):
            raise UserError(f"{path}: the model {key} names ({now.get(key, '')}) is not the one the run was trained "
                            "with: its files changed since (trained again, rebuilt, its chat template edited); restore "
                            "it or start a new run")
    if num_steps is not None and "num_steps" in state and state["num_steps"] != num_steps:  # (older: not kept)
        raise UserError(f"{path} belongs to a run of {state['num_steps']} steps, this one plans {num_steps}; "
                        "start a new run")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_training_state(run_dir: Path, name: str, *, accelerator: Any, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any, sharded: bool, state: dict[str, Any],
                        keep: int) -> None:
    """Write RUN/checkpoints/`name` (the main process; every process takes part) with the stage's
    `state` (its position: iteration or step, data order, controllers) and keep the newest `keep`
    of the same prefix. `sharded`: the model is FSDP2-sharded, each rank writes its shards."""
    import numpy as np
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rng_all = gather_object([rng])  # one per process, in rank order
    target = run_dir / CHECKPOINTS_DIR / name
    is_main = accelerator.is_main_process
    if sharded:  # every rank writes its shards first, into a directory only the main rank renames
        from align.distributed import save_sharded

        shards = target.with_name(f".{target.name}.sharded")
        if is_main:
            shutil.rmtree(shards, ignore_errors=True)  # left by a run killed while writing
        accelerator.wait_for_everyone()
        save_sharded(model, optimizer, shards)
        accelerator.wait_for_everyone()
    if is_main:
        with atomic_directory(target, overwrite=True) as tmp:
            if sharded:
                os.replace(shards, tmp / SHARDED_DIR)
            else:
                save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_all, tmp / "rng_states.pt")
            write_json_atomic(tmp / STATE_FILE, {**state, "world_size": accelerator.num_processes})
        prefix = name.rsplit("-", 1)[0]
        for old in checkpoints(run_dir, prefix)[:-keep]:
            remove_hidden_first(old)
    accelerator.wait_for_everyone()



def resumed_line(stage: str, run_dir: Path, done: int, total: int, unit: str) -> str:
    """What a resumed run says as it starts: where it continues, and whether its training had
    finished (its summary was written): then only the evaluation runs again (a resume may change
    its settings), or, after a last checkpoint before the end, the steps after it are trained again."""
    where = f"{stage}: resumed {run_dir} at {unit} {done}"
    if done >= total:
        return f"{where} of {total}: its training had finished, so only the evaluation runs again"
    if (run_dir / SUMMARY_FILE).exists():
        return (f"{where} of {total}: its training had finished after its last checkpoint, so {unit}s "
                f"{done + 1}-{total} are trained again (to the same result), then the evaluation runs")
    return where


def damaged_checkpoint(path: Path, exc: BaseException) -> UserError:
    """One line for a checkpoint that cannot be read, naming what failed: a sharded load's
    CheckpointException (torch.distributed.checkpoint) carries each rank's own error, its own
    words a traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        exc = cause[0] if isinstance(cause, tuple) else cause
    words = " ".join(str(exc).split())[:200]
    return UserError(f"{path} is incomplete or damaged ({type(exc).__name__}: {words}); delete it to resume from "
                     "the checkpoint before it, or start a new run")


def check_checkpoint_layout(path: Path | None, *, processes: int, sharded: bool) -> None:
    """One line where checkpoint `path` was written by another number of processes or with other
    sharding than this run has. A resumed stage asks as it starts, before its models load (minutes at
    8B), and again as it loads the checkpoint; no checkpoint, or one whose state does not read, is
    left to that load to say."""
    if path is None:
        return
    try:
        written_by = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    _check_layout(path, written_by, processes=processes, sharded=sharded)


def _check_layout(path: Path, written_by: int, *, processes: int, sharded: bool) -> None:
    """`check_checkpoint_layout` on the process count `written_by` read from checkpoint `path`."""
    if written_by != processes:
        raise UserError(f"{path} was written by {processes_text(written_by)}; resume it with the same "
                        f"number (this run has {processes_text(processes)})")
    if (path / SHARDED_DIR).is_dir() != sharded:
        raise UserError(f"{path} was written {'with' if (path / SHARDED_DIR).is_dir() else 'without'} FSDP "
                        "sharding; resume it under the same accelerate config")


def load_training_state(path: Path, *, accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, sharded: bool,
                        check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Restore the trained weights, the optimiser, the scheduler and this process's RNGs from a
    checkpoint of `save_training_state`; returns the stage's state. The same number of processes
    and the same sharding as the run that wrote it, and whatever `check` asks of the stage's state
    (`check_same_run`) before any tensor loads, or one line saying what differs; a checkpoint
    missing a file or damaged is one line too."""
    import pickle

    import numpy as np
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def damaged(exc: BaseException) -> UserError:
        return damaged_checkpoint(path, exc)

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        written_by = state["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(exc) from None
    _check_layout(path, written_by, processes=accelerator.num_processes, sharded=sharded)
    if check is not None:
        check(state)
    try:
        if sharded:
            from torch.distributed.checkpoint.api import CheckpointException

            from align.distributed import load_sharded

            try:
                load_sharded(model, optimizer, path / SHARDED_DIR)
            except CheckpointException as exc:  # (a BaseException) every rank raises it, none waits
                raise damaged(exc) from None
        else:
            weights = load_file(str(path / "trainable.safetensors"))
            params = dict(model.named_parameters())
            # every trained tensor, or the run would go on from a fresh one without a word
            if missing := [n for n, p in params.items() if p.requires_grad and n not in weights]:
                raise ValueError(f"trainable.safetensors holds no {missing[0]!r} ({len(missing)} trained tensors missing)")
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            # read onto the CPU: saved from the main rank's device, each rank's optimiser moves it to its own
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
        rng = torch.load(path / "rng_states.pt", map_location="cpu", weights_only=False)[accelerator.process_index]
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as exc:
        raise damaged(exc) from None
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def truncate_metrics(path: Path, key: str, last: int) -> list[dict[str, Any]]:
    """On resume, drop the metric rows whose `key` (iteration, step) is past the checkpoint's `last`
    (they will be written again); returns the rows kept."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get(key, 0) <= last:
            rows.append(row)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return rows


_HELD: dict[Path, int] = {}  # run directories this process holds, with the descriptor holding each


def hold_run_dir(run_dir: Path) -> None:
    """Hold `run_dir` (an existing directory) for this run (the main process; a run of this process
    holds it again): a second run into it at the same time, whose config, metrics and checkpoints would
    mix with this one's, is refused. An advisory lock on the directory itself (flock(2)), let go by
    `release_run_dir` or as the process ends; where the file system has none (some network mounts),
    nothing is held."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    if int(os.environ.get("RANK", "0")) != 0 or run_dir.resolve() in _HELD:
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"output_dir {run_dir} is in use by a run that has not ended: wait for it, or choose "
                        "another output_dir") from None
    except OSError:
        os.close(fd)
        return
    _HELD[run_dir.resolve()] = fd


def release_run_dir(run_dir: Path) -> None:
    """Let go of a run directory `hold_run_dir` holds (the run has ended, or stopped)."""
    fd = _HELD.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, prefix: str, command: str,
                  config_class: type | None = None, outputs: Iterable[str] = (),
                  inputs: Mapping[str, str | None] | None = None) -> None:
    """Before anything loads: a resumed run has a checkpoint; a fresh run does not write into a
    run directory that holds anything unless `overwrite` (`clear_earlier_run` removes the earlier
    run's checkpoints and `outputs` once this one has loaded everything it needs), and then reads
    none of its `inputs` (config key -> path: a policy, a data file) from what it replaces.
    `command`: how the user resumes it (`align ppo`)."""
    for path in (run_dir, *run_dir.parents):  # the nearest that exists must be a directory
        try:
            exists = path.exists()
        except OSError as exc:  # a name longer than the file system allows, a path it cannot read
            raise UserError(f"output_dir {run_dir}: {exc.strerror or exc}") from None
        if exists:
            if not path.is_dir():
                raise UserError(f"output_dir {run_dir}: {path} is a file, not a directory")
            break
    if run_dir.is_dir():  # else held as start_run_dir creates it (a run refused before then leaves no folder)
        if not os.access(run_dir, os.W_OK | os.X_OK):  # said before anything loads, not at the first write
            raise UserError(f"output_dir {run_dir}: the folder is not writable")
        hold_run_dir(run_dir)
    if resume:
        if latest_checkpoint(run_dir, prefix) is None:
            raise UserError(f"{run_dir}: no checkpoint to resume from ({CHECKPOINTS_DIR}/{prefix}-* not found)")
        return
    if config_class is not None and (run_dir / CONFIG_FILE).is_file():
        from align.config import foreign_keys

        foreign = foreign_keys(config_class, run_dir / CONFIG_FILE)
        if foreign:  # neither resumed nor replaced: its outputs would stay beside this run's and be read as its own
            raise UserError(f"output_dir {run_dir} holds another stage's run (its config.yaml has "
                            f"{', '.join(foreign[:5])}): overwrite=true replaces an earlier `{command}` run only; "
                            "choose another output_dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        resumable = f"resume it with `{command} --resume {run_dir}`, " if latest_checkpoint(run_dir, prefix) else ""
        raise UserError(f"output_dir {run_dir} is not empty: {resumable}choose another output_dir, or set "
                        "overwrite=true")
    replaced = [run_dir / name for name in (CONFIG_FILE, METRICS_FILE, *outputs)] + checkpoints(run_dir, prefix)
    if overwrite and not (run_dir / CONFIG_FILE).is_file():  # no earlier run: what has a run's names is not a run's
        found = [p.name for p in replaced if p.exists() or p.is_symlink()]
        if found:
            raise UserError(f"output_dir {run_dir} holds {', '.join(found[:5])} but no run's {CONFIG_FILE}: "
                            f"overwrite=true replaces an earlier `{command}` run only, and would delete them; "
                            "choose another output_dir")
    for key, value in (inputs or {}).items():
        path = Path(value).expanduser().resolve() if value else None
        hit = next((r for r in replaced if path is not None and path.is_relative_to(r.resolve())), None)
        if hit is not None:
            raise UserError(f"{key} {value} is the earlier run's {hit.relative_to(run_dir)}, which overwrite=true "
                            f"replaces in output_dir {run_dir}: copy it elsewhere first, or choose another output_dir")


def start_run_dir(run_dir: Path, cfg: Any, prefix: str, outputs: Iterable[str], *, resume: bool) -> None:
    """The run directory as the run starts writing to it (main process), once it has loaded all it
    needs: config.yaml holds the resolved config, a resumed run's too (with the settings a resume
    may change: the config exactly as used); the hidden temporaries of a save that was cut short (a
    checkpoint's, an output's: align.run.atomic_directory, write_json_atomic) go; a fresh run clears
    what an earlier run left (`clear_earlier_run`)."""
    hold_run_dir(make_directory(run_dir))
    prepare_run_dir(run_dir, cfg)
    outputs = tuple(outputs)
    directory = run_dir / CHECKPOINTS_DIR
    cut_short = [*(directory.glob(f".{prefix}-*") if directory.is_dir() else []),
                 *(path for name in (*outputs, CONFIG_FILE, METRICS_FILE) for path in run_dir.glob(f".{name}.*"))]
    for path in cut_short:
        remove_path(path)
    if not resume:
        clear_earlier_run(run_dir, prefix, outputs)


def clear_earlier_run(run_dir: Path, prefix: str, outputs: Iterable[str]) -> None:
    """A fresh run's start (main process), once it has loaded everything it needs: what an earlier
    run of the stage left in its directory (`overwrite=true`) goes, and only that: RUN/checkpoints/
    <prefix>-* with their hidden temporaries, and the stage's `outputs` (names in RUN), so no summary,
    samples or value head of the earlier run passes for this one's. Other files are left alone."""
    directory = run_dir / CHECKPOINTS_DIR
    for path in [*checkpoints(run_dir, prefix), *(directory.glob(f".{prefix}-*") if directory.is_dir() else [])]:
        shutil.rmtree(path, ignore_errors=True)
    for name in outputs:
        remove_path(run_dir / name)
