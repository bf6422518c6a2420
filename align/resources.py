"""Files that ship with align: the YAML configs."""

from __future__ import annotations

from pathlib import Path


def configs_dir() -> Path:
    """The YAML configs: `align/configs` in an installed wheel, `configs/` beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"
