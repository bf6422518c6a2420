"""align.run's atomic output directory: all or nothing, and nothing left beside it."""

from __future__ import annotations

import pytest

from align.run import atomic_directory


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
