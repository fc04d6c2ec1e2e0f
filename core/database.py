"""The job database: one engine per process, sessions for units of work, Alembic migrations run from code.

SQLite (the default, for one machine) and PostgreSQL (for a deployment) are both first-class: every test of
the job records runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number: the PostgreSQL advisory lock that keeps an API and a worker starting together from
# running the same migration twice.
MIGRATION_LOCK = 0x6E6164
# The databases the service runs on, each with the asyncio driver the API reads it through.
ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "psycopg"}
# Seconds to open a PostgreSQL connection (libpq's connect_timeout, unless the URL sets its own). Without it, a
# server that accepts connections and never answers (stalled, or a proxy before a dead one) held every request
# for libpq's two minutes and more, where the API is to answer 503 at once.
CONNECT_TIMEOUT = 5
# A connection whose peer vanished (its host lost, the network cut) fails within about a minute instead of
# waiting on TCP's retransmissions for a quarter of an hour: a worker's heartbeat and progress writes go on it.
# libpq's keepalives probe an idle connection, tcp_user_timeout (ms) bounds unacknowledged data. A server that
# stalls on a live connection is still waited for: only a client-side statement timeout would end that.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
              "tcp_user_timeout": 30_000}


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


def _driver_begins_nothing(dbapi_connection, _record) -> None:
    """Python's sqlite3 begins a transaction of its own only at the first write: `_begin_immediate` begins them."""
    dbapi_connection.isolation_level = None


def _begin_immediate(connection) -> None:
    """Every transaction takes SQLite's write lock as it begins, as PostgreSQL's SELECT ... FOR UPDATE locks a
    row: otherwise a worker's read of a queued job and its update could straddle the owner's cancel, which the
    update then overwrote (the job ran, its owner told it was cancelled), two copies of a message could both
    start the job, and two processes migrating a new file both made its tables. The busy timeout makes the
    others wait their turn. A connection without a transaction (AUTOCOMMIT: the API's reads through
    `make_reader`, `Database.ping`) takes no lock, and with WAL is never held up by a writer."""
    if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for `url`; a SQLite file's folder is created, so `var/nad.db` works on a fresh checkout."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, connect_args=_connect_args(parsed))
    if parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # said as any database that cannot be used, not as a traceback
            raise ArgumentError(f"cannot make the SQLite file's folder {folder}: {error.strerror}") from None
    engine = create_engine(url)
    event.listen(engine, "connect", _tune_sqlite)
    event.listen(engine, "connect", _driver_begins_nothing)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def _connect_args(parsed: URL) -> dict[str, int]:
    """libpq's timeouts above, each unless the URL sets its own."""
    return {name: value for name, value in {"connect_timeout": CONNECT_TIMEOUT, **KEEPALIVES}.items()
            if name not in parsed.query}


def async_url(url: str) -> URL:
    """The same database through an asyncio driver: aiosqlite for SQLite, psycopg (which speaks both) for
    PostgreSQL."""
    parsed = make_url(url)
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{ASYNC_DRIVERS[parsed.get_backend_name()]}")


def make_reader(url: str) -> AsyncEngine:
    """An asyncio engine for reads without a transaction (autocommit), tuned like `make_engine`'s."""
    parsed = async_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    engine = create_async_engine(parsed, isolation_level="AUTOCOMMIT", pool_pre_ping=not sqlite,
                                 connect_args={} if sqlite else _connect_args(parsed))
    if sqlite:
        event.listen(engine.sync_engine, "connect", _tune_sqlite)
    return engine


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction for Alembic (`Database.migrate`, and the `alembic` command through
    `migrations/env.py`). PostgreSQL: an advisory lock, so that an API and a worker starting together run a
    migration once. SQLite: foreign keys off while it runs (SQLite takes that only outside a transaction):
    batch mode changes a table by copying it and dropping the old one, and with them on, the drop of `jobs`
    deleted every artifact through ON DELETE CASCADE (downgrading 0002 did). They are checked before the
    commit, and on again after."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            driver = connection.connection.driver_connection  # below SQLAlchemy: no transaction begun for it
            driver.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                yield connection
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the migration left rows whose foreign keys point nowhere; rolled back")
        finally:
            if sqlite:
                driver.execute("PRAGMA foreign_keys=ON")


class Database:
    """An engine and its session factory: what the API keeps in its state and the worker in its process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._reader: AsyncEngine | None = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self._sessions.begin() as session:
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A look without a transaction, for the API's reads, on an asyncio engine made at the first read.

        Each statement sees what is committed, and no BEGIN or COMMIT travels to the database. Being asyncio,
        a status read waits for the database on the event loop instead of in a thread of the API's pool: the
        handoffs to and from that pool cost more than the query (docs/benchmarks.md). The core functions run
        on it unchanged with `await session.run_sync(function, ...)`. For reads only: without a transaction a
        write would be committed on its own at once, with nothing to roll it back."""
        if self._reader is None:
            self._reader = make_reader(self.url)
        async with AsyncSession(self._reader, expire_on_commit=False) as session:
            yield session

    def ping(self) -> None:
        """Raise unless the database answers a query. Outside a transaction: on SQLite one would wait for the
        write lock, and /readyz would call the database down while a migration or a worker's write held it."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("SELECT 1"))

    def migrate(self) -> None:
        """Bring the schema to the newest revision; a no-op when it is there already."""
        from alembic import command
        from alembic.config import Config

        config = Config(str(MIGRATIONS / "alembic.ini"))
        config.set_main_option("script_location", str(MIGRATIONS))
        with migrating(self.engine) as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def dispose(self) -> None:
        """Close pooled connections (at process exit, or before a test drops the database). The asyncio
        engine's connections belong to the event loop that opened them: `dispose_reader` closes them there."""
        self.engine.dispose()

    async def dispose_reader(self) -> None:
        if self._reader is not None:
            await self._reader.dispose()
            self._reader = None


def migrate_database(url: str) -> None:
    """Bring the database at `url` to the newest schema on a connection of its own, closed after: what a process
    does once before it serves (`python -m api`, a worker, the tests' fixtures)."""
    database = Database(url)
    try:
        database.migrate()
    finally:
        database.dispose()
