"""The job database: one engine per process, sessions for units of work, Alembic migrations run from code.

SQLite (the default, for one machine) and PostgreSQL (for a deployment) are both first-class: every test of
the job records runs against both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number: the PostgreSQL advisory lock that keeps an API and a worker starting together from
# running the same migration twice.
MIGRATION_LOCK = 0x6E6164


class Base(DeclarativeBase):
    """The declarative base of every table (`core.jobs`, `core.keys`)."""


def _tune_sqlite(dbapi_connection, _record) -> None:
    """WAL lets the API read while the worker writes; the busy timeout makes a writer wait for the other
    process's transaction instead of failing at once."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; a SQLite file's folder is created, so `var/nad.db` works on a fresh checkout."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _tune_sqlite)
    return engine


class Database:
    """An engine and its session factory: what the API keeps in its state and the worker in its process."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                                     expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A look without a transaction, for the API's reads: each statement sees what is committed, and no
        BEGIN or COMMIT travels to the database, which is most of the cost of a status read. For reads only:
        without a transaction a write would be committed on its own at once, with nothing to roll it back."""
        with self._readers() as session:
            yield session

    def ping(self) -> None:
        """Raise unless the database answers a query."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def migrate(self) -> None:
        """Bring the schema to the newest revision; a no-op when it is there already."""
        from alembic import command
        from alembic.config import Config

        config = Config(str(MIGRATIONS / "alembic.ini"))
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def dispose(self) -> None:
        """Close pooled connections (at process exit, or before a test drops the database)."""
        self.engine.dispose()
