"""`make demo` without a service; `make up` and `make down` (scripts/service.py) with one part killed between
two `up`s: the next `up` starts that part alone, and `down` then stops everything. The script runs as a copy in
a temporary folder, so its var/ (pid files, logs) is the test's own; the database and the broker are SQLite
files there, or a redis-server the script starts itself on a free port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from redis import Redis
from service_fixtures import ROOT, free_port, new_key, start_api
from sqlalchemy.engine import make_url

pytest_plugins = ["service_fixtures"]


@dataclass
class Service:
    """A copy of scripts/service.py under `root`, with its own settings."""

    root: Path
    env: dict[str, str]

    def run(self, command: str) -> str:
        """`service.py up` or `down`: its output, which must be a success."""
        script = self.root / "scripts" / "service.py"
        done = subprocess.run([sys.executable, str(script), command], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def pid(self, name: str) -> int:
        """The pid `up` recorded for a part."""
        return int((self.root / "var" / "run" / f"{name}.pid").read_text())

    def live(self) -> list[int]:
        """Processes running in the copy's folder, as every part `up` starts does (redis-server in var/redis): a
        zombie, which a killed part may stay where PID 1 reaps nothing, has no cwd to read."""
        found = []
        for process in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if Path(os.readlink(process / "cwd")).is_relative_to(self.root):
                    found.append(int(process.name))
        return found

    def kill(self, name: str) -> None:
        """SIGKILL a part (its whole process group: a worker's pool too), as a crash or the OOM killer would."""
        pid = self.pid(name)
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid in self.live():
            assert time.monotonic() < deadline, f"{name} (pid {pid}) outlived SIGKILL"
            time.sleep(0.1)


def _service(tmp_path: Path, broker_url: str) -> Iterator[Service]:
    """A copy of the script on settings of its own; whatever it started is stopped at the end, by `down` and
    then by SIGKILL to anything still running there (a pid file can have lost a part: the bug this tests)."""
    root = tmp_path / "root"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "service.py", root / "scripts")
    env = {name: value for name, value in os.environ.items() if not name.startswith("NAD_")} | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NAD_DATABASE_URL": f"sqlite:///{tmp_path / 'nad.db'}",
        "NAD_BROKER_URL": broker_url,
        "NAD_QUEUE": f"nad-test-{uuid.uuid4().hex[:8]}",
        "NAD_STORAGE_DIR": str(tmp_path / "storage"),
        "NAD_API_HOST": "127.0.0.1",
        "NAD_API_PORT": str(free_port()),
    }
    service = Service(root, env)
    try:
        yield service
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            service.run("down")
        for pid in service.live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sqlite_service(tmp_path: Path) -> Iterator[Service]:
    """On kombu's SQLAlchemy transport: no server needed."""
    yield from _service(tmp_path, f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[Service]:
    """On a Redis URL nothing answers, so that `up` starts a redis-server of its own."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    yield from _service(tmp_path, f"redis://127.0.0.1:{free_port()}/0")


def test_up_starts_only_the_parts_that_are_not_running(sqlite_service: Service) -> None:
    service = sqlite_service
    said, url = service.run("up"), f"http://127.0.0.1:{service.env['NAD_API_PORT']}"
    worker, api = service.pid("worker"), service.pid("api")
    key = said.split("\nAPI key:  ", 1)[1].split("\n", 1)[0]  # a key of the service it started
    assert f"\nURL:      {url}  (docs at {url}/docs;" in said
    assert httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200

    service.kill("api")
    said = service.run("up")
    assert service.pid("worker") == worker, said  # no second worker took over its pid file
    assert service.pid("api") in service.live(), said
    assert f"worker:   already running (pid {worker})" in said and "API:      started" in said, said

    service.kill("worker")
    api = service.pid("api")
    said = service.run("up")
    assert service.pid("worker") in service.live(), said
    assert service.pid("api") == api, said
    assert "worker:   started" in said and f"API:      already running (pid {api})" in said, said

    assert service.run("down") == "stopped api\nstopped worker\n"  # no word that nothing ran
    assert service.live() == []
    assert "Warm shutdown" in (service.root / "var" / "log" / "worker.log").read_text()  # SIGTERM first


def test_up_restarts_its_own_redis_server_alone(redis_service: Service) -> None:
    service = redis_service
    service.run("up")
    redis, worker, api = service.pid("redis"), service.pid("worker"), service.pid("api")
    client = Redis.from_url(service.env["NAD_BROKER_URL"])
    try:  # on this machine alone, never evicting a message, its data kept in var/redis through a crash
        config = client.config_get()
        assert (config["bind"], config["maxmemory-policy"]) == ("127.0.0.1", "noeviction"), config
        assert config["dir"] == str((service.root / "var" / "redis").resolve()), config
        client.set("nad-test-kept", "1")
    finally:
        client.close()

    service.kill("redis")
    said = service.run("up")
    assert service.pid("redis") in service.live(), said
    assert (service.pid("worker"), service.pid("api")) == (worker, api), said
    assert said.startswith("broker:   redis-server on port") and " started (pid" in said.splitlines()[0], said
    assert f"worker:   already running (pid {worker})" in said and f"API:      already running (pid {api})" in said
    redis = service.pid("redis")
    client = Redis.from_url(service.env["NAD_BROKER_URL"])
    try:
        assert client.get("nad-test-kept") == b"1"
    finally:
        client.close()

    said = service.run("up")
    assert (service.pid("redis"), service.pid("worker"), service.pid("api")) == (redis, worker, api), said
    assert f" already running (pid {redis};" in said.splitlines()[0], said

    service.run("down")
    assert service.live() == []
    assert service.run("down") == "nothing `make up` started is running\n"  # it said nothing at all


def test_up_neither_takes_another_programs_port_nor_trusts_an_api_that_does_not_answer(sqlite_service: Service) -> None:
    """Another program on the API's port answered /readyz for an API that had died on the port, and `up` said it
    started; an API left by an earlier `up` that does not answer here (other settings, no storage) was trusted."""
    service, port = sqlite_service, int(sqlite_service.env["NAD_API_PORT"])
    script = [sys.executable, str(service.root / "scripts" / "service.py"), "up"]
    with socket.create_server(("127.0.0.1", port)):
        done = subprocess.run(script, cwd=service.root, env=service.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"something else listens on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert not (service.root / "var" / "run" / "api.pid").exists()
    service.run("up")  # the port is free now
    elsewhere = service.env | {"NAD_API_PORT": str(free_port())}
    done = subprocess.run(script, cwd=service.root, env=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "the API running since an earlier `make up` does not answer at" in done.stderr


def test_up_without_redis_and_with_a_part_that_does_not_start(sqlite_service: Service, postgres_url: str,
                                                              tmp_path: Path) -> None:
    """A redis:// URL nothing answers and no redis-server: kombu's SQLAlchemy transport on var/broker.sqlite, which
    the worker and the API use. A part that does not start is stopped with the children it left, its pid file
    gone, and the end of its log said. A part found dead leaves no pid file behind (its pid, reused, would be
    another program's for `down` to kill). Nothing printed holds the database's password."""
    service, tools = sqlite_service, tmp_path / "bin"
    tools.mkdir()
    script = [sys.executable, str(service.root / "scripts" / "service.py"), "up"]
    url = make_url(postgres_url)  # with a password: trust auth ignores it, a server that checks one has its own
    password = url.password or "s3cr3t"
    database = url.set(password=password).render_as_string(hide_password=False)
    service.env |= {"PATH": str(tools), "NAD_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
                    "NAD_DATABASE_URL": database}
    run = service.root / "var" / "run"
    fake = tools / "redis-server"  # one that fails after 40 lines, leaving a child of its own that runs on
    fake.write_text(f"#!/bin/sh\n{sys.executable} -c 'import time; time.sleep(300)' &\n"
                    "i=0; while [ $i -lt 40 ]; do i=$((i + 1)); echo starting $i; done\n"
                    "echo 'FATAL: no way to start'\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run(script, cwd=service.root, env=service.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith(
        "redis-server did not start; the end of var/log/redis.log:\n"), done.stderr
    assert done.stderr.endswith("\nFATAL: no way to start\n") and password not in done.stdout + done.stderr
    assert service.live() == [] and list(run.iterdir()) == []

    fake.unlink()
    said = service.run("up")
    assert said.splitlines()[0] == ("broker:   no Redis answers and none is installed: kombu's SQLAlchemy transport "
                                    "on var/broker.sqlite (fine for one machine; use Redis for anything more)"), said
    assert (service.root / "var" / "broker.sqlite").is_file()  # the worker's and the API's broker
    assert f"\ndatabase: {make_url(database).render_as_string()}\n" in said and password not in said, said

    service.kill("worker")
    (service.root / "worker").mkdir()  # before the repository's on the worker's path: one that cannot start
    (service.root / "worker" / "__init__.py").touch()
    (service.root / "worker" / "app.py").write_text("raise RuntimeError('a worker planted to fail')\n")
    done = subprocess.run(script, cwd=service.root, env=service.env, capture_output=True, text=True, timeout=300)
    shutil.rmtree(service.root / "worker")
    assert done.returncode == 1 and "the worker did not start; the end of var/log/worker.log:\n" in done.stderr
    assert "a worker planted to fail" in done.stderr and not (run / "worker.pid").exists(), done.stderr

    service.kill("api")
    assert service.run("down") == "nothing `make up` started is running\n"
    assert list(run.iterdir()) == []


def test_up_says_a_setting_or_database_it_cannot_use_in_one_line(sqlite_service: Service, tmp_path: Path) -> None:
    """As `nad keys` does: the variable to fix and why, not a traceback that names pydantic's field. Nothing starts;
    the API and the worker, started by hand, say it so too, and the API under uvicorn names itself (it said
    "worker:", the module it imported to send jobs)."""
    script = sqlite_service.root / "scripts" / "service.py"
    missing = f"sqlite:///{tmp_path}"  # a folder: no database file can be opened there
    (tmp_path / "file").touch()
    under_a_file = f"sqlite:///{tmp_path}/file/nad.db"  # its folder cannot be made
    for variable, value, said in (("NAD_API_PORT", "abc", "make up: NAD_API_PORT: Input should be a valid integer"),
                                  ("NAD_DATABASE_URL", missing, "make up: cannot use the database of NAD_DATABASE_URL: "
                                                                "unable to open database file"),
                                  ("NAD_DATABASE_URL", under_a_file, "make up: cannot use the database of "
                                   f"NAD_DATABASE_URL: cannot make the SQLite file's folder {tmp_path}/file: ")):
        done = subprocess.run([sys.executable, str(script), "up"], cwd=sqlite_service.root, capture_output=True,
                              env=sqlite_service.env | {variable: value}, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.startswith(said) and done.stderr.count("\n") == 1, done.stderr
    assert sqlite_service.live() == []
    for command, name in (([sys.executable, "-m", "api"], "python -m api"),
                          ([sys.executable, "-m", "celery", "-A", "worker.app", "worker"], "worker")):
        done = subprocess.run(command, cwd=sqlite_service.root, capture_output=True, text=True,
                              env=sqlite_service.env | {"NAD_API_PORT": "abc"}, timeout=120)
        assert done.returncode == 1 and done.stderr == f"{name}: NAD_API_PORT: Input should be a valid integer, " \
                                                       "unable to parse string as an integer\n", done.stderr
        # a database it cannot use: the worker said it was ready, its migration's failure logged by Celery
        done = subprocess.run(command, cwd=sqlite_service.root, capture_output=True, text=True,
                              env=sqlite_service.env | {"NAD_DATABASE_URL": missing}, timeout=120)
        last = done.stderr.splitlines()[-1]
        assert done.returncode == 1 and last == f"{name}: cannot use the database of NAD_DATABASE_URL: unable to " \
                                                "open database file", done.stderr
    uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--port", str(free_port())]
    done = subprocess.run(uvicorn, cwd=sqlite_service.root, capture_output=True, text=True,
                          env=sqlite_service.env | {"NAD_API_PORT": "abc"}, timeout=120)
    assert done.returncode == 1 and done.stderr == "api: NAD_API_PORT: Input should be a valid integer, unable to " \
                                                   "parse string as an integer\n", done.stderr


def test_make_demo_stops_at_once_when_no_service_is_ready() -> None:
    """Not after minutes of training a model, nor on a database `make up` never made: it says what to do."""
    env = os.environ | {"NAD_API_URL": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and f"no service is ready at {env['NAD_API_URL']}: " in done.stderr, done.stderr
    assert "make up" in done.stderr and "case:" not in done.stdout
    done = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env | {"NAD_API_PORT": "abc"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "make demo: NAD_API_PORT: Input should be a valid integer, " \
                                                   "unable to parse string as an integer\n", done.stderr


def test_make_demo_stops_at_once_when_the_service_does_not_take_its_key(make_settings, tmp_path: Path) -> None:
    """A key made in this machine's database is no key of a service elsewhere: said before any training. A key
    it takes goes on to `nad submit`, whose exit status is the demo's: here the service refuses the upload. The
    demo runs as a copy there, with a stand-in for the model it would otherwise train for minutes."""
    settings, port = make_settings(max_upload_bytes=1), free_port()
    root = tmp_path / "root"
    (root / "scripts").mkdir(parents=True)
    for name in ("demo.py", "service.py"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts")
    (root / "tests").symlink_to(ROOT / "tests")
    (root / "var" / "demo").mkdir(parents=True)
    (root / "var" / "demo" / "digits-backdoored.safetensors").write_bytes(b"a stand-in")
    api = start_api(settings, port, tmp_path / "api.log")
    try:
        env = os.environ | {"NAD_API_URL": f"http://127.0.0.1:{port}", "NAD_API_KEY": "nad_not_a_key_of_it"}
        done = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        # without NAD_API_KEY it makes one in NAD_DATABASE_URL's database: one never migrated is said in one line
        env = os.environ | {"NAD_API_URL": f"http://127.0.0.1:{port}", "NAD_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
        unusable = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=120)
        env = os.environ | {"NAD_API_URL": f"http://127.0.0.1:{port}", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                            "NAD_API_KEY": new_key(settings)["Authorization"].removeprefix("Bearer ")}
        refused = subprocess.run([sys.executable, str(root / "scripts" / "demo.py")], cwd=root, env=env,
                                 capture_output=True, text=True, timeout=300)
    finally:
        api.kill()
    assert done.returncode == 1 and "does not take this API key" in done.stderr and "case:" not in done.stdout
    assert unusable.returncode == 1 and unusable.stderr.count("\n") == 1, unusable.stderr
    assert unusable.stderr.startswith("make demo: cannot use the database of NAD_DATABASE_URL: ")
    assert "set NAD_API_KEY" in unusable.stderr
    assert refused.returncode == 2 and "case: a WRN-16-1 backdoored on scikit-learn's digits" in refused.stdout, (
        refused.stdout + refused.stderr)


def _script() -> ModuleType:
    """scripts/service.py as a module, to call its functions here."""
    spec = importlib.util.spec_from_file_location("service_script", ROOT / "scripts" / "service.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_up_prints_urls_without_their_passwords() -> None:
    """What `up` prints may land in a CI log or a terminal's scrollback."""
    script = _script()
    assert script._shown("postgresql+psycopg://nad:s3cr3t@db:5432/nad") == "postgresql+psycopg://nad:***@db:5432/nad"
    assert script._shown("redis://:s3cr3t@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert script._shown("sentinel://:s3:cr3t@a:26379;sentinel://u:pw@b/0") == (
        "sentinel://:***@a:26379;sentinel://u:***@b/0")
    assert script._shown("sqlite:///var/nad.db") == "sqlite:///var/nad.db"
    assert script._shown("redis://u:pa@ss@h:6379/0") == "redis://u:***@h:6379/0"
    assert script._shown("redis://h/0?db=1&password=s3cr3t") == "redis://h/0?db=1&password=***"
    assert script._shown("redis://user@h:6379/0") == "redis://user@h:6379/0"


def test_up_chooses_the_broker_the_readme_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Redis of a redis:// URL that answers; else a redis-server of its own on the URL's port (6379 when it
    names none), only where that URL is this machine; else kombu's SQLAlchemy transport. Said without passwords."""
    script, started = _script(), []
    monkeypatch.setattr(script, "_alive", lambda name: None)
    monkeypatch.setattr(script, "_redis_answers", lambda url: False)
    monkeypatch.setattr(script.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(script, "_start_redis", lambda *args: started.append(args) or 4242)
    assert script.choose_broker("redis://localhost/0") == (
        "redis://localhost/0", "broker:   redis-server on port 6379 started (pid 4242; data in var/redis)")
    assert started == [("/opt/bin/redis-server", "redis://localhost/0", "6379")]
    fallback = f"sqla+sqlite:///{ROOT / 'var' / 'broker.sqlite'}"
    assert script.choose_broker("redis://redis.example:6379/0")[0] == fallback and len(started) == 1
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    assert script.choose_broker("redis://127.0.0.1:6390/0") == (fallback, (
        "broker:   no Redis answers and none is installed: kombu's SQLAlchemy transport on var/broker.sqlite "
        "(fine for one machine; use Redis for anything more)"))
    assert script.choose_broker("sqla+postgresql://nad:s3cr3t@db/nad") == (
        "sqla+postgresql://nad:s3cr3t@db/nad", "broker:   sqla+postgresql://nad:***@db/nad (as NAD_BROKER_URL says)")
    monkeypatch.setattr(script, "_redis_answers", lambda url: True)
    assert script.choose_broker("redis://:s3cr3t@db:6390/0") == (
        "redis://:s3cr3t@db:6390/0", "broker:   the Redis at redis://:***@db:6390/0")


def test_an_api_is_ready_when_its_readyz_says_200_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """503 is an API whose database, broker or storage is not usable: `up` and `make demo` do not go on with it."""
    script = _script()
    for status, ready in ((200, True), (503, False), (404, False)):
        monkeypatch.setattr(script.httpx, "get", lambda url, timeout, status=status: httpx.Response(status))
        assert script.ready("http://127.0.0.1:1") is ready, status
