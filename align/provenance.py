"""What a run was trained on, by content: fingerprints of model checkpoints (their weight, config
and tokenizer files, down the bases their adapters name) that a resume checks against its checkpoint
(`align.checkpoint.check_same_run`), and the record a finished run keeps of the models its outputs
stand on (RUN/trained_on.json), which `align export` checks before it puts the adapter onto a base."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.run import write_json_atomic

log = logging.getLogger("align")

# weights, configs, tokenizers and their chat templates (transformers 5 keeps a template in chat_template.jinja,
# no longer inside tokenizer_config.json: an edited template changes what the policy is prompted with)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt", ".jinja")
FINGERPRINT_FORMAT = "2:"  # how a fingerprint begins that reads chat templates; an older one is a bare digest


def model_fingerprint(path: str | Path, *, templates: bool = True) -> str:
    """sha256 of a checkpoint's contents, read cheaply: the weight, config and tokenizer files of its
    directory and of the bases its adapters name (align.modeling.adapter_chain), each by its name,
    size and first and last MiB. A resumed run checks that its models are the checkpoint's: a
    reward model trained again into the same folder, an SFT checkpoint rebuilt in place, a chat
    template edited. `templates=False`: read as fingerprints were before they read chat templates."""
    from align.modeling import adapter_chain

    digest = hashlib.sha256()
    for directory in adapter_chain(path, find_only=True):
        for file in _model_files(directory, templates=templates):
            _digest_file(digest, file)
    return FINGERPRINT_FORMAT + digest.hexdigest() if templates else digest.hexdigest()


def matches_fingerprint(path: str | Path, fingerprint: str) -> bool:
    """Whether the checkpoint at `path` is the one `fingerprint` was taken of, read as it was read then:
    a checkpoint or record written before fingerprints read chat templates still resumes or exports."""
    if not isinstance(fingerprint, str):  # a damaged checkpoint's: not this model's
        return False
    return model_fingerprint(path, templates=fingerprint.startswith(FINGERPRINT_FORMAT)) == fingerprint


def _model_files(directory: Path, *, templates: bool = True) -> list[Path]:
    """The files of `directory` that `model_fingerprint` reads, by name."""
    files = sorted(directory.iterdir()) if directory.is_dir() else []
    suffixes = MODEL_FILE_SUFFIXES if templates else tuple(s for s in MODEL_FILE_SUFFIXES if s != ".jinja")
    return [f for f in files if f.suffix in suffixes and f.is_file()]


def _digest_file(digest: Any, file: Path) -> None:
    """Feed `digest` a file's name, size and first and last MiB."""
    size = file.stat().st_size
    digest.update(f"{file.name}\0{size}\0".encode())
    with file.open("rb") as handle:
        digest.update(handle.read(2**20))
        if size > 2**21:
            handle.seek(size - 2**20)
        digest.update(handle.read())


def model_fingerprints(paths: Mapping[str, Path | None]) -> dict[str, str]:
    """{config key: model_fingerprint} of a run's models (a key whose model has no path: left out)."""
    return {key: model_fingerprint(path) for key, path in paths.items() if path is not None}


# --------------------------------------------------------------------------- a finished run's models

MODELS_RECORD_FILE = "trained_on.json"  # RUN/trained_on.json: the models a finished run's outputs stand on


def model_file_digests(path: str | Path) -> list[dict[str, Any]]:
    """`path` and the bases its adapters name, as `model_fingerprint` reads them: for each folder its
    path and {file name: sha256 of what the fingerprint reads of it}, to say which file changed."""
    from align.modeling import adapter_chain

    levels = []
    for directory in adapter_chain(path, find_only=True):
        files = {}
        for file in _model_files(directory):
            digest = hashlib.sha256()
            _digest_file(digest, file)
            files[file.name] = digest.hexdigest()
        levels.append({"path": str(directory), "files": files})
    return levels


def write_models_record(path: Path, models: Mapping[str, Path | None]) -> None:
    """Write `path` (a run's MODELS_RECORD_FILE) for the models its outputs stand on (config key -> the
    checkpoint as the run loaded it; a key with no path is left out): each one's path, fingerprint and
    files down its adapter chain. A finished run's adapter is exported later, onto whatever its base
    folder then holds: `check_models_record` tells it apart from what the run was trained on."""
    write_json_atomic(path, {key: {"path": str(model), "fingerprint": model_fingerprint(model),
                                   "chain": model_file_digests(model)}
                             for key, model in models.items() if model is not None})


def check_models_record(path: Path, models: Mapping[str, Path], *, purpose: str) -> None:
    """One line when a model of `models` (config key -> the checkpoint read now) is not the one the record
    at `path` (`write_models_record`) says the run was trained on, naming it and the files that changed;
    `purpose`: what would go on anyway ('export the run'). Nothing to check: a run finished before runs
    kept a record, a key it does not hold, and a model not found here (what loads it says so)."""
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: damaged ({type(exc).__name__}); delete it to {purpose} unchecked") from None
    for key, model in models.items():
        entry = recorded.get(key) if isinstance(recorded, dict) else None
        if not isinstance(entry, dict) or not entry.get("fingerprint"):
            continue
        now = model_file_digests(model)
        if not all(Path(level["path"]).is_dir() for level in now):
            log.warning("%s: %s %s is not found here: not checked against the one the run was trained on",
                        path.parent, key, model)
            continue
        recorded_chain = entry.get("chain") or []
        if ([level["files"] for level in _weights_and_configs(recorded_chain)]  # by content, not by place
                == [level["files"] for level in _weights_and_configs(now)] if recorded_chain
                else matches_fingerprint(model, entry["fingerprint"])):
            continue
        trained_on = str(entry.get("path", model))
        changes = _changes(_weights_and_configs(recorded_chain), _weights_and_configs(now))
        if Path(trained_on).resolve() == Path(model).resolve():
            what = f"its {key} {trained_on} changed since the run was trained on it ({changes}; rebuilt or trained again in place?)"
        else:  # moved, or named anew: the same files would do, these are others
            what = f"its {key} is now {model}, which is not the {trained_on} the run was trained on ({changes})"
        raise UserError(f"{path.parent}: {what}, and the run's adapter would go onto other weights: restore that "
                        f"checkpoint or train the run again (or delete {path} to {purpose} anyway)")


def _is_weights_or_config(name: str) -> bool:
    """A file that decides what an adapter goes onto: the weights and the architecture. A generation
    config, a tokenizer (the run saved its own) or a trainer's notes beside them may change freely."""
    return (name.endswith(".safetensors") or name in ("config.json", "adapter_config.json")
            or (name.startswith(("pytorch_model", "adapter_model")) and name.endswith(".bin")))


def _weights_and_configs(chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A `model_file_digests` chain narrowed to its `_is_weights_or_config` files."""
    return [{"path": level.get("path"), "files": {name: digest for name, digest in level.get("files", {}).items()
                                                  if _is_weights_or_config(name)}} for level in chain]


def _changes(recorded: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """What differs between two `model_file_digests` of a model: the first folder whose files differ and
    which of them ('model.safetensors changed, tokenizer.json added', a base down the chain named), or
    the chain itself."""
    if recorded and len(recorded) != len(now):
        return (f"its adapter chain is now {' -> '.join(level['path'] for level in now)}, where it was "
                f"{' -> '.join(str(level.get('path')) for level in recorded)}")
    for depth, (before, after) in enumerate(zip(recorded, now)):
        old, new = before.get("files", {}), after["files"]
        words = [f"{name} {'added' if name not in old else 'removed' if name not in new else 'changed'}"
                 for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
        if words:
            shown = ", ".join(words[:4]) + (f" and {len(words) - 4} more" if len(words) > 4 else "")
            return shown if depth == 0 else f"its base {after['path']}: {shown}"
    return "its files changed"
