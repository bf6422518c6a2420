"""Sources of rankings that cross stages: the annotation app's database read by reward training.

The training stages do not import the annotation app (they build on each other: DPO samples and
evaluates with PPO's policy pieces); this module, above both, hands the reward stage a reader of
annotation projects that goes through the app's own export code.
"""

from __future__ import annotations

from pathlib import Path

from align.errors import UserError
from align.formats import Ranking


def read_annotation_project(db_url: str, project: str) -> list[Ranking]:
    """The project's latest rankings, exactly as `align annotate export --format kwise` writes them.
    Reading never creates a database: a SQLite file that is not there is a mistyped path."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DatabaseError

    from align.chat import messages_problem
    from annotation.db import open_db
    from annotation.db_url import masked
    from annotation.services import export_rankings, get_project

    try:
        url = make_url(db_url)
    except ArgumentError:
        raise UserError(f"data.db_url: {masked(db_url)!r} is not a database URL (sqlite:///FILE, postgresql://...)") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).is_file():
        raise UserError(f"data.db_url: database not found: {url.database}")
    try:
        make_session = open_db(db_url)
    except UserError as exc:  # no server, a file that is no database: said of the key that named it
        raise UserError(f"data.db_url: {exc}") from None
    try:
        with make_session() as db:
            rankings = list(export_rankings(db, get_project(db, project)))
    except DatabaseError as exc:
        raise UserError(f"data.db_url: cannot read {masked(db_url)} ({str(exc.orig or exc).splitlines()[0]})") from None
    for ranking in rankings:  # a database may hold prompts from before the readers' rules: held to them, as a file is
        problem = isinstance(ranking.prompt, list) and messages_problem(ranking.prompt)
        if problem:
            raise UserError(f"data.db_url: project {project!r}, prompt {ranking.prompt_id!r}: {problem}")
    return rankings


def register_ranking_sources() -> None:
    """Make `data.format=annotation` of the reward stage read annotation projects."""
    from reward.sources import PROJECT_READERS

    PROJECT_READERS["annotation"] = read_annotation_project
