"""Jobs whose broker message was lost (a Redis restarted without its data) are sent again by the sweeper, once,
and never run twice: on the real Redis and PostgreSQL, and end to end with a real worker process."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import kombu.exceptions
import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_fixtures import new_key, refused, start_worker, wait_for
from sqlalchemy import update
from test_service_e2e import SHORT, submit, training

import worker.dispatch
from api.app import create_app
from core import jobs
from core.database import Database, migrate_database
from core.settings import Settings
from core.storage import Storage
from worker.broker import BROKER_TIMEOUT, make_celery
from worker.dispatch import Sweeper, broker_task_ids, send_job, sweep

pytest_plugins = ["service_fixtures"]


def lose_messages(settings: Settings) -> list[bytes]:
    """What a Redis restarted without its data does to the settings' queue; returns the messages lost."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        lost = client.lrange(settings.queue, 0, -1)
        client.delete(settings.queue)
        return lost
    finally:
        client.close()


def take_unacknowledged(app: Celery, message: bytes) -> Callable[[], None]:
    """Hold a message as a worker that took it and has not yet acknowledged it (its job not yet started); returns
    what gives it up (the worker acknowledged it)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        key, tag = channel.unacked_key, f"test-{uuid.uuid4().hex}"
        raw = json.loads(message)
        channel.client.hset(key, tag, json.dumps([raw, raw["properties"]["delivery_info"]["exchange"],
                                                  raw["properties"]["delivery_info"]["routing_key"]]))

    def acknowledged() -> None:
        with app.connection_for_write() as connection:
            connection.default_channel.client.hdel(key, tag)

    return acknowledged


def give_back(settings: Settings, message: bytes) -> None:
    """Put a message back on the settings' queue, as a Redis restored from an older snapshot would."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        client.lpush(settings.queue, message)
    finally:
        client.close()


def dispatch_of(settings: Settings, job_id: str) -> int:
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            return session.get(jobs.Job, job_id).dispatch
    finally:
        db.dispose()


def test_the_sweeper_sends_again_only_jobs_whose_message_is_gone(
    make_settings, module_postgres_url: str, digits_backdoor
) -> None:
    settings = make_settings(database_url=module_postgres_url)  # no worker consumes its queue
    queue, db, storage = make_celery(settings), Database(settings.database_url), Storage(settings.storage_dir)

    def sent(grace: float) -> list[str]:
        return sweep(queue, db, storage, settings.queue, grace, max_attempts=3).sent

    with TestClient(create_app(settings)) as client:
        headers = new_key(settings)
        kept, lost, taken = (submit(client, headers, digits_backdoor, **SHORT) for _ in range(3))
        assert broker_task_ids(queue, settings.queue) >= {f"{kept}-0", f"{lost}-0", f"{taken}-0"}
        assert sent(grace=0) == []  # every message is there
        elsewhere = jobs.new_job_id()  # a job of another queue sharing the database: not this sweeper's
        with db.session() as session:
            jobs.create_job(session, elsewhere, "someone", "another-queue", {}, [])

        messages = lose_messages(settings)
        (kept_message,) = [m for m in messages if kept.encode() in m]
        (taken_message,) = [m for m in messages if taken.encode() in m]
        give_back(settings, kept_message)
        acknowledged = take_unacknowledged(queue, taken_message)  # a worker took it, and has not started the job
        try:
            assert sent(grace=3600) == []  # not waiting long enough yet
            assert sent(grace=0) == [lost]
            assert sent(grace=0) == []  # sent once
        finally:
            acknowledged()
        assert broker_task_ids(queue, settings.queue) >= {f"{kept}-0", f"{lost}-1"}
        assert (dispatch_of(settings, kept), dispatch_of(settings, lost), dispatch_of(settings, taken),
                dispatch_of(settings, elsewhere)) == (0, 1, 0, 0)
        assert client.get(f"/jobs/{lost}", headers=headers).json()["status"] == "queued"
    db.dispose()


def broker_refused(*args: object, **kwargs: object) -> None:
    """A send to a broker that went down: what kombu raises once its retries are spent."""
    raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def silence(db: Database, job_id: str) -> None:
    """The job's last heartbeat an hour ago: its worker died then, or the database has been out since."""
    with db.session() as session:
        session.execute(update(jobs.Job).where(jobs.Job.id == job_id)
                        .values(heartbeat_at=jobs.clock(session) - timedelta(hours=1)))


def queued_long_ago(db: Database, job_id: str) -> None:
    """The job queued an hour ago, and its message never sent (or lost since)."""
    with db.session() as session:
        session.execute(update(jobs.Job).where(jobs.Job.id == job_id).values(
            status=jobs.Status.QUEUED, updated_at=jobs.clock(session) - timedelta(hours=1)))


def started_job(settings: Settings) -> tuple[Celery, Database, str]:
    """The app and the migrated database of `settings`, and a job of its queue that a worker has started."""
    app, db = make_celery(settings), Database(settings.database_url)
    migrate_database(settings.database_url)
    job_id = jobs.new_job_id()
    with db.session() as session:
        jobs.create_job(session, job_id, "someone", settings.queue, {}, [])
    with db.session() as session:
        assert jobs.start_attempt(session, job_id, 0, runner="a run") is not None
    return app, db, job_id


def test_a_running_job_goes_back_to_the_queue_only_when_two_rounds_find_it_silent(
    make_settings, module_postgres_url: str
) -> None:
    """After a database outage every heartbeat is old, live jobs' too. A round that came before the job's next
    beat queued it again while its worker still trained it, and a second worker ran it beside the first (found
    by the chaos hunt). Its worker speaks up within a quarter of the interval once the database is back."""
    settings = make_settings(database_url=module_postgres_url)
    app, db, job_id = started_job(settings)
    storage = Storage(settings.storage_dir)
    silence(db, job_id)  # the database was out
    first = sweep(app, db, storage, settings.queue, max_attempts=3, grace=60)
    assert first.sent == [] and first.silent == {(job_id, 0)}
    with db.session() as session:
        assert jobs.heartbeat(session, job_id, 0)  # it is back, and the worker beats
    second = sweep(app, db, storage, settings.queue, max_attempts=3, grace=60, silent_before=first.silent)
    assert second.sent == [] and second.silent == frozenset() and dispatch_of(settings, job_id) == 0
    silence(db, job_id)  # now the worker dies
    third = sweep(app, db, storage, settings.queue, max_attempts=3, grace=60, silent_before=second.silent)
    assert third.sent == [] and third.silent == {(job_id, 0)}
    fourth = sweep(app, db, storage, settings.queue, max_attempts=3, grace=60, silent_before=third.silent)
    assert fourth.sent == [job_id] and dispatch_of(settings, job_id) == 1
    assert broker_task_ids(app, settings.queue) >= {f"{job_id}-1"}
    db.dispose()


@pytest.mark.parametrize("ending", ["failed", "cancelled"])
def test_a_job_the_sweeper_ends_keeps_none_of_its_killed_runs_files(
    make_settings, module_postgres_url: str, monkeypatch, ending: str
) -> None:
    """A job whose worker died out of attempts fails, and a cancelling one ends cancelled, with no run of
    theirs left to tidy up after the killed ones: what those wrote stayed until the job was deleted. Through
    the worker's own sweeper step, with its settings' attempts and storage."""
    settings = make_settings(database_url=module_postgres_url, max_attempts=1)
    app, db, job_id = started_job(settings)
    if ending == "cancelled":
        with db.session() as session:
            jobs.request_cancel(session, session.get(jobs.Job, job_id))
    storage = Storage(settings.storage_dir)
    upload, written = storage.path(job_id, "inputs/model"), storage.output_path(job_id, 0)
    for path in (upload, written):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"bytes")
    silence(db, job_id)
    monkeypatch.setattr(worker.dispatch, "get_settings", lambda: settings)
    sweeper = Sweeper(SimpleNamespace(app=app))
    sweeper.run(app)
    sweeper.run(app)
    with db.session() as session:
        job = session.get(jobs.Job, job_id)
        assert (job.status, job.dispatch) == (ending, 0)
        assert job.error is None if ending == "cancelled" else "finished, at its one start (out of" in job.error
    db.dispose()
    assert f"{job_id}-1" not in broker_task_ids(app, settings.queue)
    assert not written.parent.exists() and upload.read_bytes() == b"bytes"  # its uploads go when it is deleted


def test_the_sweeper_keeps_a_round_s_silent_jobs_for_the_next_and_forgets_them_when_a_round_fails(
    make_settings, module_postgres_url: str, monkeypatch
) -> None:
    """A failed round may mean the database was out since the last: what the round before it saw no longer
    counts, and a job silent at the rounds around the failure is not taken from its worker yet."""
    settings = make_settings(database_url=module_postgres_url)
    app, db, job_id = started_job(settings)
    silence(db, job_id)
    monkeypatch.setattr(worker.dispatch, "get_settings", lambda: settings)
    sweeper = Sweeper(SimpleNamespace(app=app))
    sweeper.run(app)
    assert sweeper.silent == {(job_id, 0)}
    with monkeypatch.context() as outage:
        outage.setattr(jobs, "silent", refused)
        sweeper.run(app)
    assert sweeper.silent == frozenset()
    sweeper.run(app)
    db.dispose()
    assert sweeper.silent == {(job_id, 0)} and dispatch_of(settings, job_id) == 0


@pytest.mark.parametrize("lost", ["worker", "message"])
def test_a_sending_the_broker_refuses_leaves_the_job_as_it_was_for_the_next_round(
    make_settings, module_postgres_url: str, monkeypatch, lost: str
) -> None:
    """The sweeper committed its claim of a new sending, then sent. A send the broker refused left the job queued
    under a dispatch no message carries, and with a broker whose queue it cannot read (RabbitMQ) nothing sent it
    ever after. The claim now commits with its message sent only: a job whose worker died, or whose message was
    lost, is as it was, and the next round sends it."""
    settings = make_settings(database_url=module_postgres_url)
    app, db, job_id = started_job(settings)
    storage, silent = Storage(settings.storage_dir), frozenset({(job_id, 0)})
    if lost == "worker":
        silence(db, job_id)
        broker = make_celery(settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:1//"}))
    else:  # Redis goes down between the sweeper's read and its send
        queued_long_ago(db, job_id)
        broker = app
    with monkeypatch.context() as outage, pytest.raises(kombu.exceptions.OperationalError):
        if lost == "message":
            outage.setattr(worker.dispatch, "send_job", broker_refused)
        sweep(broker, db, storage, settings.queue, grace=60, max_attempts=3, silent_before=silent)
    with db.session() as session:
        job = session.get(jobs.Job, job_id)
        assert (job.status, job.dispatch) == ("running" if lost == "worker" else "queued", 0)
    again = sweep(app, db, storage, settings.queue, grace=60, max_attempts=3, silent_before=silent)
    db.dispose()
    assert again.sent == [job_id] and dispatch_of(settings, job_id) == 1
    assert f"{job_id}-1" in broker_task_ids(app, settings.queue)


def test_with_a_broker_whose_queue_cannot_be_read_a_job_waiting_its_turn_fails_no_round(
    make_settings, module_postgres_url: str
) -> None:
    """With RabbitMQ, say, the sweeper cannot tell a lost message from one waiting, and sends none again. A job
    queued for longer than the interval (every worker busy) must not fail the round: a failed round forgets
    the silent jobs it found, and no dead worker's job would be taken back while any job waits its turn."""
    settings = make_settings(database_url=module_postgres_url)
    _, db, running = started_job(settings)
    waiting = jobs.new_job_id()
    with db.session() as session:
        jobs.create_job(session, waiting, "someone", settings.queue, {}, [])
    queued_long_ago(db, waiting)
    silence(db, running)
    rabbit = make_celery(settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:1//"}))
    storage = Storage(settings.storage_dir)
    first = sweep(rabbit, db, storage, settings.queue, grace=60, max_attempts=1)
    assert first.sent == [] and first.silent == {(running, 0)}
    second = sweep(rabbit, db, storage, settings.queue, grace=60, max_attempts=1, silent_before=first.silent)
    with db.session() as session:
        assert (session.get(jobs.Job, running).status, session.get(jobs.Job, waiting).status) == ("failed", "queued")
    db.dispose()
    assert second.sent == [] and dispatch_of(settings, waiting) == 0


@pytest.mark.parametrize("lost", ["worker", "message"])
def test_a_worker_given_the_new_message_before_its_claim_commits_waits_and_runs_the_job(
    make_settings, database: Database, monkeypatch, lost: str
) -> None:
    """The sweeper sends before its claim commits. A worker that takes the message meanwhile must not find the
    job under its old dispatch and drop the message, which would lose the job: its start waits on the claim's
    lock (the row's on PostgreSQL, the file's on SQLite), and then runs the job. For a job whose worker died,
    and for one whose message was lost."""
    settings = make_settings(database_url=database.url)
    app, db, job_id = started_job(settings)
    if lost == "worker":
        silence(db, job_id)
    else:
        queued_long_ago(db, job_id)
    starts: list[jobs.Assignment | None] = []
    worker_db = Database(settings.database_url)

    def start(dispatch: int) -> None:
        with worker_db.session() as session:
            starts.append(jobs.start_attempt(session, job_id, dispatch, runner="a run"))

    def send_and_take(app: Celery, job: str, dispatch: int) -> None:
        send_job(app, job, dispatch)
        taker.append(threading.Thread(target=start, args=(dispatch,)))
        taker[0].start()
        taker[0].join(timeout=1.0)
        assert taker[0].is_alive(), "the start did not wait for the claim"

    taker: list[threading.Thread] = []
    monkeypatch.setattr(worker.dispatch, "send_job", send_and_take)
    swept = sweep(app, db, Storage(settings.storage_dir), settings.queue, grace=60, max_attempts=3,
                  silent_before=frozenset({(job_id, 0)}))
    taker[0].join(timeout=15)
    worker_db.dispose()
    db.dispose()
    assert swept.sent == [job_id] and [start.dispatch for start in starts] == [1]


@pytest.mark.parametrize("broker", ["sqla+sqlite:///{folder}/var/../nad.db", "sqlalchemy+sqlite:///{folder}/nad.db",
                                    "sqla+sqlite:///file:{folder}/nad.db?uri=true",
                                    "redis://127.0.0.1:1/0;sqla+sqlite:///{folder}/nad.db"])
def test_the_broker_may_not_live_in_the_job_databases_sqlite_file(tmp_path: Path, broker: str) -> None:
    """The sweeper's send would wait on the lock its own claim holds (`worker.dispatch`): by either of kombu's
    names for the transport, either form of a SQLite URL, or as the fallback in a list of brokers."""
    database = f"sqlite:///{tmp_path / 'nad.db'}"
    with pytest.raises(ValidationError, match="cannot share the job database's SQLite file"):
        Settings(database_url=database, broker_url=broker.format(folder=tmp_path))
    elsewhere = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    assert Settings(database_url=database, broker_url=elsewhere).broker_url == elsewhere


def test_with_a_broker_other_than_redis_the_sweeper_still_takes_back_a_dead_workers_job(
    make_settings, tmp_path: Path, monkeypatch
) -> None:
    """`make up` falls back to kombu's SQLAlchemy transport where no Redis is installed. The sweeper was off
    altogether there, and a job whose worker process died stayed running for ever: the message given back at
    once finds it started, and runs nothing. A queued job whose message is not in the transport's table is sent
    again too."""
    settings = make_settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    db, app = Database(settings.database_url), make_celery(settings)
    migrate_database(settings.database_url)
    running, queued = jobs.new_job_id(), jobs.new_job_id()
    with db.session() as session:
        for job_id in (running, queued):
            jobs.create_job(session, job_id, "someone", settings.queue, {}, [])
    with db.session() as session:
        session.execute(update(jobs.Job).where(jobs.Job.id == queued)
                        .values(updated_at=jobs.clock(session) - timedelta(hours=1)))
        assert jobs.start_attempt(session, running, 0, runner="a run") is not None
    silence(db, running)
    monkeypatch.setattr(worker.dispatch, "get_settings", lambda: settings)
    timer = SimpleNamespace(call_repeatedly=lambda *args, **kwargs: "a timer")
    sweeper = Sweeper(SimpleNamespace(app=app))
    sweeper.start(SimpleNamespace(app=app, timer=timer))
    sweeper.run(app)
    sweeper.run(app)
    db.dispose()
    assert sweeper.timer_ref == "a timer"
    assert (dispatch_of(settings, running), dispatch_of(settings, queued)) == (1, 1)
    assert broker_task_ids(app, settings.queue) == {f"{running}-1", f"{queued}-1"}


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://redis.example:6380/0",
                                 "redis+socket:///run/redis.sock", "sqla+sqlite:///var/broker.sqlite"])
def test_every_url_that_reaches_redis_gets_its_redelivery_clock_and_timeouts(url: str, tmp_path: Path) -> None:
    """A prefix check took redis:// and rediss:// for Redis, and left a redis+socket:// broker with Redis's
    one-hour redelivery clock, under the six hours a job may run. kombu's own name for the transport decides,
    for these options and for the sweeper's look for lost messages alike; connecting to nothing."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'nad.db'}", broker_url=url)
    app, redis_ = make_celery(settings), url.startswith("redis")
    assert worker.dispatch.broker_transport(app) == ("redis" if redis_ else "sql")
    options = app.conf.broker_transport_options
    assert options.get("visibility_timeout") == (settings.visibility_timeout if redis_ else None)
    assert settings.visibility_timeout > app.conf.task_time_limit  # no running job is handed out twice
    assert options.get("socket_timeout") == (BROKER_TIMEOUT if redis_ else None)


def test_a_worker_takes_one_job_at_a_time_and_acknowledges_it_only_when_it_ends(tmp_path: Path) -> None:
    """At-least-once delivery: a job's message is acknowledged when its task returns, and given back when its
    worker process dies; one job at a time per worker, none held back in a busy one's buffer, a fresh process
    for each; the hard time limit a minute past the soft one, for the run to record its end. And every worker
    runs the sweeper."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'nad.db'}", broker_url="redis://127.0.0.1:6379/0",
                        job_time_limit=600)
    app = make_celery(settings)
    assert (app.conf.task_acks_late, app.conf.task_reject_on_worker_lost) == (True, True)
    assert (app.conf.worker_concurrency, app.conf.worker_prefetch_multiplier, app.conf.worker_max_tasks_per_child) \
        == (1, 1, 1)
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (600, 660)
    assert app.conf.broker_transport_options["socket_connect_timeout"] == BROKER_TIMEOUT
    assert Sweeper in app.steps["worker"]


def test_with_kombus_sqlalchemy_transport_the_sweeper_sends_again_only_jobs_whose_message_is_gone(
    make_settings, tmp_path: Path
) -> None:
    """`make up`'s fallback broker keeps a message a worker has taken in that worker's memory only: a worker
    killed between taking a job's message and starting the job lost it, and the job stayed queued for ever, as
    did one whose sending failed after it was queued again."""
    broker = tmp_path / "broker.sqlite"
    settings = make_settings(broker_url=f"sqla+sqlite:///{broker}")
    app, db, storage = make_celery(settings), Database(settings.database_url), Storage(settings.storage_dir)
    migrate_database(settings.database_url)

    def sent(grace: float) -> list[str]:
        return sorted(sweep(app, db, storage, settings.queue, grace, max_attempts=3).sent)

    kept, taken, unsent = sorted(jobs.new_job_id() for _ in range(3))
    with db.session() as session:
        for job_id in (kept, taken, unsent):
            jobs.create_job(session, job_id, "someone", settings.queue, {}, [])
    for job_id in (kept, taken):
        send_job(app, job_id, 0)
    send_job(make_celery(make_settings(broker_url=settings.broker_url)), unsent, 0)  # another queue's
    assert broker_task_ids(app, settings.queue) == {f"{kept}-0", f"{taken}-0"}
    with sqlite3.connect(broker) as connection:  # what the transport does as a worker takes a message
        connection.execute("UPDATE kombu_message SET visible = 0 WHERE payload LIKE ?", (f"%{taken}-0%",))
    connection.close()
    assert broker_task_ids(app, settings.queue) == {f"{kept}-0"}
    assert sent(grace=3600) == []  # not waiting long enough yet
    assert sent(grace=0) == [taken, unsent]
    assert sent(grace=0) == []  # sent once
    assert broker_task_ids(app, settings.queue) == {f"{kept}-0", f"{taken}-1", f"{unsent}-1"}
    db.dispose()


def test_a_job_lost_by_the_broker_runs_once_after_the_sweep(
    make_settings, module_postgres_url: str, digits_backdoor, tmp_path: Path
) -> None:
    """The lost message comes back after the sweep (a Redis restored from an old snapshot, say): the worker
    drops it and the job runs once, from its new message."""
    settings = make_settings(database_url=module_postgres_url, sweep_interval=1)
    with TestClient(create_app(settings)) as client:
        headers = new_key(settings)
        job_id = submit(client, headers, digits_backdoor, **SHORT)
        (old_message,) = lose_messages(settings)
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            job = wait_for(client, job_id, headers, timeout=300, log=worker.log)
            give_back(settings, old_message)
            wait_until(lambda: b"nothing to run" in worker.log.read_bytes(), timeout=60)
            again = client.get(f"/jobs/{job_id}", headers=headers).json()
        finally:
            worker.kill()
    assert json.loads(old_message)["headers"]["id"] == f"{job_id}-0"
    assert job["status"] == "succeeded" and job["attempts"] == 1 and dispatch_of(settings, job_id) == 1
    assert again["attempts"] == 1 and again["updated_at"] == job["updated_at"]


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_job_whose_whole_worker_died_runs_again_on_a_new_worker(
    make_settings, module_postgres_url: str, digits_backdoor, tmp_path: Path
) -> None:
    """kill -9 of the worker and its pool at once gives nothing back to the queue (Redis would wait out its
    visibility timeout of hours); the new worker's sweeper finds the job silent and queues it again."""
    settings = make_settings(database_url=module_postgres_url, sweep_interval=2)
    with TestClient(create_app(settings)) as client:
        headers = new_key(settings)
        first = start_worker(settings, tmp_path / "first.log")
        try:
            job_id = submit(client, headers, digits_backdoor, **SHORT)
            wait_for(client, job_id, headers, done=training, log=first.log)
        finally:
            first.kill()
        second = start_worker(settings, tmp_path / "second.log")
        try:
            job = wait_for(client, job_id, headers, timeout=300, log=second.log)
        finally:
            second.kill()
    assert job["status"] == "succeeded" and job["attempts"] == 2 and dispatch_of(settings, job_id) == 1
    assert "stopped giving signs of life" in second.log.read_text()
