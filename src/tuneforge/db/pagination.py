"""Cursor pagination as the OpenAI API does it: `after` is the id of the last item of the previous page.

Keyset pages on a monotonic column (seq, or a checkpoint's step), so a page costs the same deep in a
long list as at its start, and one limit + 1 read tells whether there is more.
"""

from __future__ import annotations

from sqlalchemy import Select, select
from sqlalchemy.orm import Session


def keyset_page(
    session: Session, query: Select, *, key, id_column, after: str | None, limit: int, scope=None, descending: bool = True
) -> tuple[list, bool]:
    """(rows, has_more) of query ordered by key, starting after the row whose id is `after` (within scope)."""
    if after:
        anchor_query = select(key).where(id_column == after)
        if scope is not None:
            anchor_query = anchor_query.where(scope)
        anchor = session.scalar(anchor_query)
        if anchor is not None:
            query = query.where(key < anchor if descending else key > anchor)
    rows = list(session.scalars(query.order_by(key.desc() if descending else key.asc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
