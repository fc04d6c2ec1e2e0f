"""The service's configuration: environment variables prefixed `NAD_`, and nothing else.

The API, the worker, `nad keys` and `make up` all read this one class, so a deployment is configured in one
place (the README lists every variable). The `nad submit` client has its own two variables in
`ClientSettings`: it runs on a user's machine, not beside the service.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from kombu import Connection
from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from core.database import ASYNC_DRIVERS
from core.params import CAPPED_EPOCHS


class Settings(BaseSettings):
    """Everything the API and the worker need to agree on, with defaults for one machine (`make up`)."""

    model_config = SettingsConfigDict(env_prefix="NAD_", frozen=True)

    database_url: str = Field(
        default="sqlite:///var/nad.db",
        description="SQLAlchemy URL of the job database, e.g. postgresql+psycopg://user:pw@host/db",
    )
    # Not empty, either: Celery takes an empty broker URL for RabbitMQ on localhost, and an empty queue is one no
    # worker listens to, so every job would stay queued.
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", min_length=1, description="Celery broker URL")
    queue: str = Field(default="nad", min_length=1, description="the broker queue jobs are sent to and taken from")
    storage_dir: Path = Field(
        default=Path("var/storage"), description="folder holding every job's files; shared by API and worker"
    )
    max_upload_bytes: int = Field(default=2 << 30, ge=1, description="size cap of each uploaded file")
    max_queued_jobs: int = Field(
        default=10, ge=1, description="jobs one API key may have queued or running; more are refused with 429"
    )
    max_epochs: int = Field(
        default=200, ge=1,
        description=f"cap on a job's {', '.join(f'`{name}`' for name in CAPPED_EPOCHS)}, checked at submission",
    )
    max_images: int = Field(
        default=200_000, ge=1, description="cap on the images of one job's archives together (clean, test, "
        "poison); the worker fails a job past it, counting while it reads"
    )
    auth_enabled: bool = Field(default=True, description="require an API key on every job endpoint")
    key_cache_seconds: float = Field(
        default=5.0, ge=0, allow_inf_nan=False,
        description="seconds an API process trusts a key it has checked without asking the database again; a "
                    "revoked key keeps working that long at most; 0 checks every request",
    )
    job_time_limit: int = Field(
        default=6 * 3600, ge=10, description="seconds a job may run before it is stopped and failed; `auto` skips "
        "a candidate it estimates would not finish within it, and stops one that runs out of it between epochs, "
        "leaving 5 % of it (at most a minute) to write and record the result"
    )
    max_attempts: int = Field(
        default=3, ge=1, description="how often a job is started before the sweeper fails one whose worker keeps dying"
    )
    sweep_interval: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="seconds between two sweeps of a worker: a running job whose heartbeat two sweeps in a row find "
                    "that old is queued again (its worker died), and a queued job whose broker message was lost (a "
                    "Redis restarted without its data; with kombu's SQLAlchemy transport, a worker killed as it "
                    "took it) is sent again once it has waited that long",
    )
    api_host: str = Field(default="127.0.0.1", description="address `python -m api` listens on")
    api_port: int = Field(default=8000, ge=1, le=65535, description="port `python -m api` listens on")
    api_workers: int = Field(
        default=1, ge=1, le=64, description="API processes `python -m api` serves with; one per core answers the "
        "most status reads (docs/benchmarks.md)"
    )

    @field_validator("storage_dir", mode="before")
    @classmethod
    def _a_folder(cls, value: object) -> object:
        """An empty NAD_STORAGE_DIR would be the current folder: jobs' files among whatever is there."""
        if value == "":
            raise ValueError("an empty path; name the folder for the jobs' files")
        return value

    @field_validator("database_url")
    @classmethod
    def _a_database_url(cls, url: str) -> str:
        """Parsed, and its dialect and driver loaded, now: a typo (a port of letters, an unknown dialect), a
        database the service does not run on (the API reads through an asyncio driver it knows for SQLite and
        PostgreSQL alone) or a driver not installed is said as this setting's error, not as a traceback or a
        500 from wherever the database is first opened."""
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as error:
            raise ValueError(f"not a database URL ({error})") from None
        if parsed.get_backend_name() not in ASYNC_DRIVERS:
            raise ValueError(f"the service keeps its jobs in SQLite or PostgreSQL, not {parsed.get_backend_name()}")
        try:
            if parsed.get_dialect().is_async:  # the workers and migrations need a blocking driver
                raise ValueError(f"{parsed.drivername} is an asyncio driver; name a blocking one, e.g. "
                                 "postgresql+psycopg or sqlite (the API reads through its own asyncio driver)")
            create_engine(url).dispose()  # connects to nothing: it loads the dialect and driver, as opening does
        except ArgumentError as error:  # a driver SQLAlchemy does not know (sqlite+nodriver)
            raise ValueError(f"not a database URL ({error})") from None
        except ImportError as error:  # its message may run over lines (psycopg's when libpq is missing)
            raise ValueError(f"its database driver is not installed ({' '.join(str(error).split())})") from None
        return url

    @field_validator("broker_url")
    @classmethod
    def _a_broker_of_its_own(cls, url: str, info: ValidationInfo) -> str:
        """kombu's SQLAlchemy transport may not live in the job database's SQLite file: the sweeper sends a
        message before the claim that names it commits (`worker.dispatch`), and that send would wait on the
        claim's own lock, so no job the sweeper took back would ever be sent."""
        database = info.data.get("database_url")  # absent when it was refused itself
        database_file = _sqlite_file(database) if database else None
        if database_file is not None and database_file in _broker_sqlite_files(url):
            raise ValueError("kombu's SQLAlchemy transport cannot share the job database's SQLite file "
                             "(NAD_DATABASE_URL); give it a file of its own, e.g. sqla+sqlite:///var/broker.sqlite")
        return url

    @property
    def visibility_timeout(self) -> int:
        """Seconds Redis waits before handing an unacknowledged job to another worker. It must exceed the
        longest a job can take (the hard limit is a minute past `job_time_limit`), or a running job would be
        delivered twice."""
        return self.job_time_limit + 600


def _broker_sqlite_files(url: str) -> list[Path]:
    """The SQLite files of kombu's SQLAlchemy transport among the brokers of `url` (Celery takes a list, each
    tried when the one before is down), by kombu's own reading of it: its name for the transport (`sqla+` and
    `sqlalchemy+` alike), as the worker's `broker_transport` asks. Connects to nothing; a transport kombu does
    not know is Celery's to refuse."""
    try:
        connection = Connection(url)
        brokers = [Connection(alternative) for alternative in connection.alt] or [connection]
        sql = [broker.hostname for broker in brokers if broker.transport.driver_type == "sql"]
    except KeyError:
        return []
    return [file for file in map(_sqlite_file, sql) if file is not None]


def _sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, resolved, in its plain form (`sqlite:///var/nad.db`) or its URI form
    (`sqlite:///file:var/nad.db?uri=true`); None for any other URL, and for SQLite in memory."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    name = parsed.database
    if parsed.query.get("uri") == "true" and name.startswith("file:"):
        name = name.removeprefix("file:").partition("?")[0]
    return Path(name).resolve()


class ClientSettings(BaseSettings):
    """Defaults of `nad submit`, so a user sets the service's address and their key once."""

    model_config = SettingsConfigDict(env_prefix="NAD_", frozen=True, extra="ignore")

    api_url: str = Field(default="http://127.0.0.1:8000", description="base URL of the service")
    api_key: str | None = Field(default=None, description="API key sent as `Authorization: Bearer`")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once from its environment."""
    return Settings()
