"""Alembic's entry: migrate the connection `Database.migrate` passes in, or NAD_DATABASE_URL's database when
a developer runs the `alembic` command (through `core.database.migrating` either way)."""

from alembic import context

import core.jobs  # noqa: F401  (registers its tables on Base.metadata)
import core.keys  # noqa: F401
from core.database import Base, make_engine, migrating
from core.settings import get_settings


def run(connection) -> None:
    # render_as_batch: SQLite can only change a table by copying it, which batch mode does.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with migrating(make_engine(get_settings().database_url)) as own_connection:
        run(own_connection)
