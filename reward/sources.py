"""Ranking sources that live in another stage: the annotation app's projects.

The training stages do not import the annotation app, so the command layer above both
(`align.commands.sources`) registers its reader here. Kept free of torch so the `align` command can register at start-up.
"""

from __future__ import annotations

from collections.abc import Callable

from align.errors import UserError
from align.formats import Ranking

# "annotation" -> reader(db_url, project name) -> the project's latest rankings
PROJECT_READERS: dict[str, Callable[[str, str], list[Ranking]]] = {}


def read_project_rankings(db_url: str, project: str) -> list[Ranking]:
    """The project's latest rankings, read through the annotation app's own export code."""
    reader = PROJECT_READERS.get("annotation")
    if reader is None:
        raise UserError("data.format=annotation is read through the `align` command; from Python call "
                        "align.commands.sources.register_ranking_sources() first, or export the project "
                        "(`align annotate export --format kwise`) and use data.format=kwise")
    return reader(db_url, project)
