"""Alembic environment: deepserve runs migrations programmatically (`deepserve db upgrade`, and at server
start) on a connection it passes in `config.attributes["connection"]`; there is no alembic.ini."""

from __future__ import annotations

from alembic import context

from deepserve.billing.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("deepserve's migrations run through deepserve.billing.db.upgrade(), which passes a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
