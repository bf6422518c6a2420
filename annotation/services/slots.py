"""Giving a lease's slot back: the one place a prompt's slot is freed, for leases that ran
out, annotators deactivated or removed from a project, and tasks skipped."""

from __future__ import annotations

from annotation.raw_sql import Sql, Transaction

_EXPIRE = Sql("UPDATE assignments SET status = 'expired' WHERE id = :id AND status = 'leased'")
_FREE_SLOT = Sql("UPDATE prompts SET slots_taken = slots_taken - 1 WHERE id = :prompt")
_LIVE_LEASES_OF = Sql("SELECT id, prompt_id FROM assignments WHERE user_id = :user AND status = 'leased' "
                      "AND (CAST(:project AS integer) IS NULL OR project_id = CAST(:project AS integer))")


def free_slot(tx: Transaction, prompt_id: int) -> None:
    """Give one of the prompt's annotator slots back, for a lease that has just ended
    without a ranking (expired, or skipped while live)."""
    _FREE_SLOT.rowcount(tx, prompt=prompt_id)


def expire_lease(tx: Transaction, assignment_id: int, prompt_id: int) -> bool:
    """Mark a live lease expired and give its slot back; False if it was not live."""
    if _EXPIRE.rowcount(tx, id=assignment_id) != 1:
        return False
    free_slot(tx, prompt_id)
    return True


def release_live_leases(tx: Transaction, user_id: int, project_id: int | None = None) -> int:
    """Expire the user's live leases (in `project_id`, or everywhere) and give their slots
    back at once, for an annotator who may no longer rank them; how many there were."""
    return sum(expire_lease(tx, aid, pid) for aid, pid in _LIVE_LEASES_OF.all(tx, user=user_id, project=project_id))
