"""Sources of rankings that cross stages: the annotation app's database read by reward training.

The stages do not import each other; this module, above both, hands the reward stage a reader
of annotation projects that goes through the app's own export code.
"""

from __future__ import annotations

from align.formats import Ranking


def read_annotation_project(db_url: str, project: str) -> list[Ranking]:
    """The project's latest rankings, exactly as `align annotate export --format kwise` writes them."""
    from annotation.db import open_db
    from annotation.services import export_rankings, get_project

    make_session = open_db(db_url)
    with make_session() as db:
        return list(export_rankings(db, get_project(db, project)))


def register_ranking_sources() -> None:
    """Make `data.format=annotation` of the reward stage read annotation projects."""
    from reward.sources import PROJECT_READERS

    PROJECT_READERS["annotation"] = read_annotation_project
