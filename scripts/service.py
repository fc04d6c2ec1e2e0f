"""`make up` and `make down`: the whole service on one machine, in the background.

up: migrates the database (SQLite at var/nad.db unless NAD_DATABASE_URL says otherwise), picks a broker (the
Redis at NAD_BROKER_URL if it answers, else a `redis-server` started here if one is installed, else kombu's
SQLAlchemy transport on SQLite, which needs no server), starts whichever of the worker and the API (and the
`redis-server` it manages) is not running, waits until the API is ready, and prints its URL and a new API key.
down: stops what up started, by the process ids it recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redis
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from core import keys
from core.cli import setup_refused
from core.database import Database
from core.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
RUN, LOG = VAR / "run", VAR / "log"
FALLBACK_BROKER = f"sqla+sqlite:///{VAR / 'broker.sqlite'}"
SERVICES = ("api", "worker", "redis")


def _alive(name: str) -> int | None:
    """The pid of a service up started, if it still runs."""
    pidfile = RUN / f"{name}.pid"
    if not pidfile.exists():
        return None
    pid = int(pidfile.read_text())
    if _running(pid):
        return pid
    pidfile.unlink()
    return None


def _running(pid: int) -> bool:
    """Whether the process runs. A service that died is a zombie until its parent reaps it, and its parent (up,
    long gone) hands it to PID 1, which in a container often reaps nothing: signal 0 still reaches a zombie, so
    it is /proc that tells a dead service from a live one (where there is a /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # it has just ended, or there is no /proc (macOS) and signal 0 must do
        return not Path("/proc").is_dir()


def _start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a service in its own session (so down can stop it and its children), logging to var/log."""
    with (LOG / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=os.environ | env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (RUN / f"{name}.pid").write_text(str(process.pid))
    return process


def _wait(name: str, what: str, started: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    """Return once `started()` says so while `process` runs. Else stop it, so that the next `up` does not take
    it for a running part by its pid file, and exit with the end of its log."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if started():
            return
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):  # its children too, where it died and left them
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (RUN / f"{name}.pid").unlink(missing_ok=True)
    tail = "\n".join((LOG / f"{name}.log").read_text(errors="replace").splitlines()[-30:])
    sys.exit(f"{what} did not start; the end of var/log/{name}.log:\n{tail}")


def _redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _shown(url: str) -> str:
    """`url` without its passwords: what `up` prints may end up in a terminal's scrollback or a CI log. A
    pattern, not a URL parser, since a broker URL may list several hosts (`sentinel://a;sentinel://b`), which
    no parser takes."""
    url = re.sub(r"(://[^:/@;]*:)[^/;]*@", r"\1***@", url)  # to a host's last @: a password may hold one
    return re.sub(r"([?&]password=)[^&;]*", r"\1***", url)  # redis-py takes one in the query too


def choose_broker(url: str) -> tuple[str, str]:
    """The broker URL to use and a sentence saying which it is."""
    if not url.startswith("redis://"):
        return url, f"broker:   {_shown(url)} (as NAD_BROKER_URL says)"
    parts = urlsplit(url)
    port = str(parts.port or 6379)
    pid = _alive("redis")
    if pid:
        return url, f"broker:   redis-server on port {port} already running (pid {pid}; data in var/redis)"
    if _redis_answers(url):
        return url, f"broker:   the Redis at {_shown(url)}"
    server = shutil.which("redis-server")
    if server and parts.hostname in ("127.0.0.1", "localhost"):
        pid = _start_redis(server, url, port)
        return url, f"broker:   redis-server on port {port} started (pid {pid}; data in var/redis)"
    return FALLBACK_BROKER, ("broker:   no Redis answers and none is installed: kombu's SQLAlchemy transport "
                             "on var/broker.sqlite (fine for one machine; use Redis for anything more)")


def _start_redis(server: str, url: str, port: str) -> int:
    """A redis-server of up's own on 127.0.0.1:port, once it answers: its pid."""
    (VAR / "redis").mkdir(exist_ok=True)
    process = _start("redis", [server, "--bind", "127.0.0.1", "--port", port, "--dir", str(VAR / "redis"),
                               "--appendonly", "yes", "--maxmemory-policy", "noeviction"], {})
    _wait("redis", "redis-server", lambda: _redis_answers(url), process, timeout=30)
    return process.pid


def up() -> None:
    """Start each part that is not running. Each is checked on its own, since each can die alone: a running
    one is left alone (a second would take over its pid file and outlive `down`), a missing one is started
    (an API without its worker queues jobs that never run)."""
    settings = get_settings()
    RUN.mkdir(parents=True, exist_ok=True)
    LOG.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url)
    database.migrate()
    url = f"http://{settings.api_host}:{settings.api_port}"
    broker, said = choose_broker(settings.broker_url)
    print(said)
    env = {"NAD_BROKER_URL": broker}
    _ensure("worker", "worker", lambda: _start_worker(env))
    _ensure("api", "API", lambda: _start_api(env, url))
    if not _ready_within(url, 10):  # one of an earlier `up` that runs on, but not here, or not well
        sys.exit(f"make up: the API running since an earlier `make up` does not answer at {url}: it was started "
                 "with other settings, or cannot reach its database or storage (var/log/api.log); `make down`, "
                 "then `make up`")
    with database.session() as session:
        _, key = keys.create_key(session, "make up")
    database.dispose()
    print(f"URL:      {url}  (docs at {url}/docs; logs in var/log; `make down` stops what `make up` started)")
    print(f"database: {_shown(settings.database_url)}")
    print(f"API key:  {key}")
    print(f"try:      curl -H 'Authorization: Bearer {key}' {url}/jobs")
    print(f"          export NAD_API_KEY={key}   # for `nad submit` and `make demo`")


def _ensure(name: str, label: str, start: Callable[[], subprocess.Popen]) -> None:
    """Start the service `name` unless it runs, and say which it was."""
    pid = _alive(name)
    if pid:
        print(f"{label + ':':<10}already running (pid {pid})")
    else:
        print(f"{label + ':':<10}started (pid {start().pid})")


def _start_worker(env: dict[str, str]) -> subprocess.Popen:
    """A Celery worker, once its log says it is ready."""
    log = LOG / "worker.log"
    start = log.stat().st_size if log.exists() else 0
    worker = _start("worker", [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel", "INFO",
                               "--without-mingle", "--without-gossip"], env)
    _wait("worker", "the worker", lambda: b" ready." in log.read_bytes()[start:], worker)
    return worker


def _start_api(env: dict[str, str], url: str) -> subprocess.Popen:
    """The API, once it answers /readyz. Not on a port another program holds: its /readyz would pass for
    this API's, which had died on the port."""
    parts = urlsplit(url)
    with contextlib.suppress(OSError), socket.create_connection((parts.hostname, parts.port), timeout=2):
        sys.exit(f"make up: something else listens on {parts.hostname}:{parts.port} (another API?); stop it, or "
                 "set NAD_API_PORT to a free port")
    api = _start("api", [sys.executable, "-m", "api"], env)
    _wait("api", "the API", lambda: ready(url), api)
    return api


def _ready_within(url: str, seconds: float) -> bool:
    """Whether the API at `url` answers /readyz within `seconds`: a moment's hiccup of its broker is no fault."""
    deadline = time.monotonic() + seconds
    while not ready(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def ready(url: str) -> bool:
    """Whether an API at `url` answers /readyz with 200 (`make demo` asks it too)."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def down() -> None:
    """SIGTERM lets the worker finish its job; a job still running after a grace period is stopped with
    SIGQUIT, which gives its message back to the broker (it runs again on the next `make up`)."""
    if not any(_alive(name) for name in SERVICES):
        print("nothing `make up` started is running")
    for name in SERVICES:
        pid = _alive(name)
        if pid is None:
            continue
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGQUIT, 30), (signal.SIGKILL, 5)):
            os.killpg(pid, sig)
            deadline = time.monotonic() + grace
            while _alive(name) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _alive(name):
                break
        (RUN / f"{name}.pid").unlink(missing_ok=True)
        print(f"stopped {name}")


if __name__ == "__main__":
    try:
        {"up": up, "down": down}[sys.argv[1]]()
    except (ValidationError, SQLAlchemyError) as error:
        sys.exit(f"make {sys.argv[1]}: {setup_refused(error)}")
