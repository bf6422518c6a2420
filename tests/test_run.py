"""align.run's atomic output directory: all or nothing, and nothing left beside it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from align.run import atomic_directory, write_json_atomic
from tests.conftest import modes


@pytest.mark.parametrize("in_the_way", ["folder", "file", "link"])
def test_a_replaced_output_leaves_nothing_beside_it(tmp_path, in_the_way):
    target = tmp_path / "out"
    if in_the_way == "folder":
        target.mkdir()
        (target / "old.txt").write_text("old")
    elif in_the_way == "file":
        target.write_text("old")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(["elsewhere"] if in_the_way == "link" else [])])
    if in_the_way == "link":  # the link went, not what it pointed at
        assert (tmp_path / "elsewhere").is_dir()


def test_a_failed_block_leaves_the_output_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("killed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_modes_of_a_plain_mkdir_and_open(tmp_path, umask, mask):
    # mkdtemp and mkstemp make owner-only temporaries (0700, 0600): an export renamed from one was
    # unreadable by a serving account. What comes out is what mkdir and open give under the umask.
    umask(mask)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "model.safetensors").write_bytes(b"x")
        (tmp / "model.safetensors").chmod(0o600)  # as safetensors writes it
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "sub" / "run.sh").chmod(0o700)
    write_json_atomic(tmp_path / "out" / "summary.json", {"a": 1})
    folder, file, executable = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    assert modes(tmp_path / "out") == {".": folder, "model.safetensors": file, "sub": folder,
                                       "sub/run.sh": executable, "summary.json": file}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"a": 1}


def test_a_resume_that_cannot_finish_writing_config_yaml_leaves_the_runs_own(tmp_path, monkeypatch):
    # a resume rewrites config.yaml (with the settings it changed); a full disk or a kill mid-write must not
    # leave it cut short, where it would still load, with defaults for the keys cut away
    from align import run
    from align.config import load_config
    from dpo.config import DPOConfig

    cfg = load_config(DPOConfig, None, [f"output_dir={tmp_path}", "epochs=3"])
    run.prepare_run_dir(tmp_path, cfg)
    before = (tmp_path / "config.yaml").read_text()

    def half_written(_cfg):
        raise OSError(27, "File too large")

    monkeypatch.setattr(run, "config_yaml", half_written)
    with pytest.raises(OSError):
        run.prepare_run_dir(tmp_path, cfg)
    assert (tmp_path / "config.yaml").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_stop_between_the_two_renames_of_a_replace_keeps_the_earlier_output(tmp_path, monkeypatch):
    # the earlier output is moved aside, then the new one into its place: a Ctrl-C between the two
    # left neither (the new one was removed, the earlier one never moved back)
    import os

    from align import run

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    replace = os.replace

    def stopped_after_the_first(src, dst):
        replace(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(run.os, "replace", stopped_after_the_first)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"


def test_a_write_that_fails_on_a_full_disk_says_so_whatever_the_library_calls_it(tmp_path, monkeypatch):
    # torch.save on a full disk raises RuntimeError("[enforce fail at inline_container.cc] unexpected pos ...")
    from align import run

    target = tmp_path / "checkpoint"
    monkeypatch.setattr(run.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(OSError) as raised, atomic_directory(target):
        raise RuntimeError("unexpected pos 615872 vs 615760")
    assert raised.value.errno == run.errno.ENOSPC and raised.value.filename == str(target)
    assert "unexpected pos" in raised.value.strerror and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(run.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**9))
    with pytest.raises(RuntimeError), atomic_directory(target):  # with space left, the error is what it says
        raise RuntimeError("a bug")


def test_a_checkpoint_removed_half_way_is_left_under_a_hidden_name(tmp_path, monkeypatch):
    from align import run

    old = tmp_path / "iter-000002"
    old.mkdir()
    (old / "trainable.safetensors").write_text("x")

    def stopped(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(run.shutil, "rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        run.remove_hidden_first(old)
    assert [p.name.startswith(".iter-000002.old-") for p in tmp_path.iterdir()] == [True]


@pytest.mark.parametrize("replacing", [False, True])
def test_an_output_is_on_the_disk_before_its_name_is(tmp_path, monkeypatch, replacing):
    # every file and folder of the output is flushed (fsync) before the rename that publishes it, and
    # the rename itself after it: a power cut cannot leave a checkpoint of empty files under its name
    import os

    target = tmp_path / "out"
    if replacing:
        target.mkdir()
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b))) or replace(a, b))
    with atomic_directory(target, overwrite=True) as d:
        (d / "model.safetensors").write_bytes(b"weights")
        (d / "optimizer").mkdir()
        (d / "optimizer" / "state.pt").write_bytes(b"state")
    published = next(i for i, (kind, path) in enumerate(events) if kind == "rename" and path == str(target))
    flushed = {Path(path).name for kind, path in events[:published] if kind == "fsync"}
    assert {"model.safetensors", "state.pt", "optimizer"} <= flushed and any(n.startswith(".out.tmp-") for n in flushed)
    assert ("fsync", str(tmp_path)) in events[published:]  # the new name itself
    assert (target / "optimizer" / "state.pt").read_bytes() == b"state"
