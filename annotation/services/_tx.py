"""Transaction helpers shared by the service modules."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotation.services.errors import Conflict


def unit_of_work(fn):
    """Every public service function ends its transaction before returning: commit on
    success, rollback on error. On SQLite each transaction holds the write lock (BEGIN
    IMMEDIATE), so a read left open after the last commit would block every other request."""

    @functools.wraps(fn)
    def wrapper(db, *args, **kwargs):
        try:
            result = fn(db, *args, **kwargs)
        except BaseException:
            db.rollback()
            raise
        if db.in_transaction():  # a commit with nothing begun would begin and end one
            db.commit()
        return result

    return wrapper


def read_only(fn):
    """A service function that only reads: runs in a read-only transaction (no SQLite
    writer lock), ended before returning."""
    from annotation.db import begin_read_only

    @functools.wraps(fn)
    def wrapper(db, *args, **kwargs):
        if db.info.get("align_read_only_depth"):  # nested: keep the caller's snapshot
            return fn(db, *args, **kwargs)
        begin_read_only(db)
        db.info["align_read_only_depth"] = 1
        try:
            result = fn(db, *args, **kwargs)
        except BaseException:
            db.rollback()
            raise
        finally:
            db.info["align_read_only_depth"] = 0
        # Commit, not rollback, ends the snapshot: a rollback would expire every object
        # read, and the caller's next attribute access would reload it in a new (on
        # SQLite: writer-locked) transaction.
        db.commit()
        return result

    return wrapper


def insert_unique(db: Session, row: Any, conflict: str, *, commit: bool = True) -> Any:
    """Add `row` (and commit unless told not to); a unique-constraint race with another
    writer becomes a Conflict."""
    db.add(row)
    try:
        if commit:
            db.commit()
        else:
            db.flush()
    except IntegrityError:
        db.rollback()
        raise Conflict(conflict) from None
    return row
