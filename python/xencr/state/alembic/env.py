"""Alembic's entry point for the state database's revisions.

xencr runs it from `xencr.state.migrate` with the connection to migrate (already in a write
transaction) in ``config.attributes["connection"]``. Developers' ``alembic`` command line gives a
URL instead: ``alembic -x url=sqlite:////tmp/dev.sqlite ...`` (see `migrate`).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from xencr.state.schema import metadata


def _run(connection: Connection) -> None:
    # Batch mode: SQLite alters a table by copying it, which Alembic does when asked.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


_given = context.config.attributes.get("connection")
if _given is not None:
    _run(_given)
else:
    _url = context.get_x_argument(as_dictionary=True).get("url")
    if not _url:
        raise SystemExit("give the database: alembic -x url=sqlite:////tmp/dev.sqlite ...")
    with create_engine(_url).begin() as _connection:
        _run(_connection)
