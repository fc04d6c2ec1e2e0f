"""Fixtures of the service's tests: a real PostgreSQL database, a real Redis, a real Celery worker process,
the API in-process or as a uvicorn process. Registered by the test modules with `pytest_plugins`.

The servers default to the ones `.ci/run` starts; NAD_TEST_POSTGRES_URL (an admin connection, which may
create databases) and NAD_TEST_REDIS_URL point elsewhere. A test that needs one of them is skipped, not
failed, when it cannot be reached.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from api.app import create_app
from core import jobs, keys
from core.database import Database, migrate_database
from core.settings import Settings

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get(
    "NAD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("NAD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FINISHED = ("succeeded", "failed", "cancelled")
# A job's params and its report as the API tests submit and store them, without a real model behind them.
PARAMS = {"arch": "wrn-16-1", "num_classes": 10}
REPORT = {
    "arch": "wrn-16-1",
    "num_classes": 10,
    "method": "nad",
    "params": PARAMS,
    "input_sha256": "0" * 64,
    "evaluation": {
        "test_source": "holdout",
        "note": "a hold-out of 250 images",
        "n_clean": 250,
        "n_poison": 225,
    },
    "before": {"acc": 80.0, "asr": 99.0, "per_class_acc": {"cat": 70.0, "dog": 90.0}},
    "after": {"acc": 78.5, "asr": 2.5, "per_class_acc": {"cat": 69.0, "dog": 88.0}},
    "history": [{"stage": "student", "epoch": 1, "epochs": 1, "loss": 0.5, "lr": 0.1}],
    "timings": {"load": 0.1, "total": 9.0},
}


def submit(
    client: TestClient,
    headers: dict[str, str],
    params: object = PARAMS,
    files: dict | None = None,
    **extra_headers: str,
) -> httpx.Response:
    files = files or {
        "model": ("model.pt", b"checkpoint bytes"),
        "clean_data": ("clean.zip", b"archive bytes"),
    }
    text = params if isinstance(params, str) else json.dumps(params)
    return client.post("/sanitize", headers=headers | extra_headers, files=files, data={"params": text})


def refused(*args: object, **kwargs: object) -> None:
    """A database call during an outage (a restart, a failover): what the driver raises."""
    raise OperationalError("UPDATE jobs ...", {}, Exception("the database system is starting up"))


def committed_then_refused(write: Callable[..., T], url: str) -> Callable[..., T]:
    """`write` whose first call commits (on a connection of its own) and then fails as if the connection
    dropped before the answer; later calls run `write` as they are."""
    answers = iter([False])

    def write_once_lost(session: object, *args: object, **kwargs: object) -> T:
        if next(answers, True):
            return write(session, *args, **kwargs)
        own = Database(url)
        try:
            with own.session() as elsewhere:
                write(elsewhere, *args, **kwargs)
        finally:
            own.dispose()
        refused()

    return write_once_lost


def taken_back(db: Database, job_id: str, dispatch: int, max_attempts: int = 3) -> jobs.Status:
    """The sweeper takes the job's silent run of `dispatch` from its dead worker; what the job became."""
    with db.session() as session:
        became = jobs.recover(session, job_id, dispatch, jobs.clock(session) + timedelta(seconds=1), max_attempts)
    assert became is not None
    return became


class StoodStill:
    """A clock that moves only when told to (`now`) and by what is slept on it, so that waits of minutes take
    no time."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def worker_clock(monkeypatch: pytest.MonkeyPatch) -> StoodStill:
    """`worker.tasks`' clock (its progress throttle, heartbeats aside, and its patient writes), stood still."""
    import worker.tasks

    clock = StoodStill()
    monkeypatch.setattr(worker.tasks, "time", clock)
    return clock


def problem(response: httpx.Response, status: int) -> dict:
    """The response's RFC 9457 problem, checked for shape and for leaks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "about:blank" and body["title"] == HTTPStatus(status).phrase
    assert body["status"] == status and body["instance"] == response.request.url.path and body["detail"]
    assert "Traceback" not in response.text and str(ROOT) not in response.text and "/tmp" not in response.text
    return body


def fresh_postgres() -> Iterator[str]:
    """A new, uniquely named PostgreSQL database, dropped when the generator is closed."""
    admin = create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        connection = admin.connect()
    except OperationalError:
        pytest.skip(f"PostgreSQL is unreachable at {make_url(POSTGRES_ADMIN_URL).render_as_string()}")
    name = f"nad_test_{uuid.uuid4().hex[:12]}"
    connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    connection.close()
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The session's PostgreSQL database."""
    yield from fresh_postgres()


@pytest.fixture(scope="module")
def module_postgres_url() -> Iterator[str]:
    """A PostgreSQL database of the module's own, for tests whose subject (the sweeper) acts on every job of
    its database: the session's holds other tests' jobs."""
    yield from fresh_postgres()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"Redis is unreachable at {REDIS_URL}")
    yield REDIS_URL
    client.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated job database on each backend: a new SQLite file, or the session's PostgreSQL database."""
    sqlite = request.param == "sqlite"
    db = Database(f"sqlite:///{tmp_path / 'nad.db'}" if sqlite else request.getfixturevalue("postgres_url"))
    db.migrate()
    yield db
    db.dispose()


def service_env(settings: Settings) -> dict[str, str]:
    """The NAD_ environment that gives another process these settings."""
    return {
        f"NAD_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in settings.model_dump().items()
    }


@pytest.fixture(scope="session")
def make_settings(postgres_url: str, redis_url: str, tmp_path_factory) -> Iterator[Callable[..., Settings]]:
    """Settings on the session's database and Redis, each call with its own queue and storage folder; the
    queues are deleted from Redis at the end."""
    queues: list[str] = []

    def make(**overrides: Any) -> Settings:
        queue = f"nad-test-{uuid.uuid4().hex[:8]}"
        queues.append(queue)
        values = {
            "database_url": postgres_url,
            "broker_url": redis_url,
            "queue": queue,
            "storage_dir": tmp_path_factory.mktemp("storage"),
            "job_time_limit": 600,
        }
        return Settings(**(values | overrides))

    yield make
    client = redis.Redis.from_url(redis_url)
    for queue in queues:  # the queue and kombu's bindings of it
        for key in client.scan_iter(match=f"*{queue}*"):
            client.delete(key)
    client.close()


def new_key(settings: Settings, name: str = "test") -> dict[str, str]:
    """Headers with a new API key of the settings' database."""
    db = Database(settings.database_url)
    with db.session() as session:
        _, secret = keys.create_key(session, name)
    db.dispose()
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="session")
def api_settings(make_settings) -> Settings:
    """The API tests' settings: their queue has no worker, so the jobs they submit stay queued. Their database
    is migrated here, not by the first `api` to start: a test that makes its own app needs its keys first."""
    settings = make_settings()
    migrate_database(settings.database_url)
    return settings


@pytest.fixture(scope="session")
def api(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as client:
        yield client


@pytest.fixture
def auth(api_settings: Settings) -> dict[str, str]:
    """A new API key for each test, so that each sees only its own jobs."""
    return new_key(api_settings)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServiceProcess:
    """A process of the service (worker or API) started for a test, with its log (and a worker's node name)."""

    process: subprocess.Popen
    log: Path
    node: str | None = None

    def children(self) -> list[int]:
        """Ids of the process's children (a Celery worker's pool process)."""
        pid = self.process.pid
        found: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
        return found

    def kill(self) -> None:
        """SIGKILL to the process group it leads (the process and its pool), then reap it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _start(
    command: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], timeout: float = 120
) -> ServiceProcess:
    with log.open("ab") as stream:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=os.environ | env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = ServiceProcess(process, log)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            started.kill()
            pytest.fail(f"{' '.join(command)} did not start:\n{tail(log)}")
        time.sleep(0.2)
    return started


def start_worker(settings: Settings, log: Path) -> ServiceProcess:
    """A real Celery worker process on the settings' broker, queue, database and storage."""
    before = log.stat().st_size if log.exists() else 0
    node = f"test-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "--hostname",
        node,
    ]
    started = _start(
        command, service_env(settings), log, lambda: log.exists() and b" ready." in log.read_bytes()[before:]
    )
    return replace(started, node=node)


def start_api(settings: Settings, port: int, log: Path) -> ServiceProcess:
    """`python -m api` on 127.0.0.1:port."""

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    env = service_env(settings) | {"NAD_API_HOST": "127.0.0.1", "NAD_API_PORT": str(port)}
    return _start([sys.executable, "-m", "api"], env, log, ready)


@pytest.fixture(scope="session")
def stack_settings(make_settings) -> Settings:
    """The settings of the end-to-end tests, whose queue a real worker consumes. A job whose worker process
    died is run again by the sweeper once silent for `sweep_interval` (the message given back at once finds the
    job started and runs nothing): 15 s, not the default minute, keeps that test short."""
    return make_settings(sweep_interval=15)


@pytest.fixture(scope="session")
def worker(stack_settings: Settings, tmp_path_factory) -> Iterator[ServiceProcess]:
    process = start_worker(stack_settings, tmp_path_factory.mktemp("worker") / "worker.log")
    yield process
    process.kill()


@pytest.fixture(scope="session")
def stack(stack_settings: Settings, worker: ServiceProcess) -> Iterator[TestClient]:
    """The API in-process, in front of the real worker."""
    with TestClient(create_app(stack_settings)) as client:
        yield client


def wait_for(
    client: TestClient | httpx.Client,
    job_id: str,
    headers: dict[str, str],
    done: Callable[[dict], bool] = lambda job: job["status"] in FINISHED,
    timeout: float = 300,
    log: Path | None = None,
) -> dict:
    """Poll a job until `done(job)`; fail with the worker's log when it takes longer than `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if done(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after {timeout} s\n{tail(log) if log else ''}")
        time.sleep(0.3)
