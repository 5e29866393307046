"""Requests that kill workers. When a stage-0 worker dies on its own (its node agent alive, the
instance not being stopped), the requests it was prefilling are the suspects: a request's input
is what a crash in the tokenizer, the engine or a native kernel most often comes from, and a
request that has its first token has been through all of that once already.

- A suspect that was being prefilled alone, or that was a suspect of an earlier death already,
  is quarantined: failed with the reason, never delivered to a worker again.
- Several suspects of one death each count it (``worker_deaths``); a worker prefills such a
  request alone (tasks/node/request_loop.py), so a second death names it.

So a request that kills a worker takes down at most one more (when it was prefilled together
with others the first time), and never a third; the requests that were decoding in the dead
worker resume elsewhere, after the tokens their clients already have.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.db import utcnow
from hydraserve.invocations.models import FINISHED, Invocation

CAUSE_CHARS = 300


def worker_died(session: Session, inv_ids: list[str], instance_id: int, cause: str) -> list[str]:
    """Records a worker's death against the requests it was prefilling; commits and returns the
    ids quarantined."""
    if not inv_ids:
        return []
    rows = session.scalars(select(Invocation).where(Invocation.id.in_(inv_ids),
                                                    Invocation.status.not_in(FINISHED))
                           .with_for_update()).all()
    quarantined = []
    for inv in rows:
        if len(inv_ids) == 1 or inv.worker_deaths > 0:
            inv.status, inv.finished_at = "failed", utcnow()
            inv.error = {"type": "internal_error", "param": None, "message": (
                f"quarantined: the worker serving it (instance {instance_id}) died while this "
                f"request was being prefilled ({cause[:CAUSE_CHARS]}); it is not run again, so "
                "that it cannot take down another worker")}
            quarantined.append(inv.id)
        inv.worker_deaths += 1
    session.commit()
    return quarantined
