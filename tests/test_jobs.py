"""Job records, API keys and storage, on real databases: each test runs on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import hashlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from service_fixtures import ROOT, StoodStill, refused, taken_back
from sqlalchemy import event, select, text, update

from core import jobs, keys
from core.cli import main
from core.database import MIGRATIONS, Base, Database, migrating
from core.engine.events import Event
from core.jobs import FileRecord, Status
from core.storage import LOCK_FILE, Storage, TooLarge, output_name, size_of
from worker.tasks import ProgressRecorder

pytest_plugins = ["service_fixtures"]

INPUTS = [
    FileRecord("model", "inputs/model", 3, "a" * 64, "m.pt"),
    FileRecord("clean_data", "inputs/clean_data", 5, "b" * 64, "clean.zip"),
]
QUEUE = "nad"
OUTPUT = FileRecord(jobs.OUTPUT, "output/0/model.safetensors", 7, "c" * 64)


def owner() -> str:
    """A new owner per test: tests sharing the session's PostgreSQL database do not see each other."""
    return uuid.uuid4().hex[:12]


def new_job(db: Database, who: str, key: str | None = None) -> str:
    job_id = jobs.new_job_id()
    with db.session() as session:
        jobs.create_job(session, job_id, who, QUEUE, {"arch": "wrn-16-1"}, INPUTS, key)
    return job_id


def status(db: Database, job_id: str) -> str | None:
    with db.session() as session:
        job = session.get(jobs.Job, job_id)
        return None if job is None else job.status


def start(db: Database, job_id: str, dispatch: int = 0, runner: str | None = None) -> jobs.Assignment | None:
    """A message of the job's `dispatch`-th sending, taken by a worker: a run of its own unless `runner` says."""
    with db.session() as session:
        return jobs.start_attempt(session, job_id, dispatch, runner or uuid.uuid4().hex)


def test_migrations_build_exactly_the_models(database: Database) -> None:
    database.migrate()  # a second run is a no-op
    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_job_is_recorded_with_its_inputs_and_visible_to_its_owner_only(database: Database) -> None:
    me = owner()
    job_id = new_job(database, me)
    with database.session() as session:
        job = jobs.get_job(session, job_id, me)
        assert job.status == Status.QUEUED and job.attempts == 0 and job.created_at.tzinfo is not None
        assert {a.role: (a.path, a.sha256) for a in job.artifacts} == {
            "model": ("inputs/model", "a" * 64),
            "clean_data": ("inputs/clean_data", "b" * 64),
        }
        assert jobs.get_job(session, job_id, owner()) is None


def test_an_idempotency_key_names_one_job_per_owner(database: Database) -> None:
    me = owner()
    key = f"retry-{me}"  # of this test alone: the session's PostgreSQL database holds other tests' keys
    first = new_job(database, me, key)
    with pytest.raises(jobs.DuplicateRequest):
        new_job(database, me, key)
    with database.session() as session:
        assert jobs.find_by_idempotency_key(session, me, key).id == first
    other = owner()
    second = new_job(database, other, key)  # the same key of another owner is another request
    with database.session() as session:
        assert second != first and jobs.find_by_idempotency_key(session, other, key).id == second
        assert jobs.find_by_idempotency_key(session, me, key).id == first


def test_job_ids_made_in_one_millisecond_still_sort_in_the_order_they_were_made() -> None:
    """The listing's order is the ids' order; a thousand ids take a few milliseconds, so many share one."""
    ids = [jobs.new_job_id() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000 and {len(i) for i in ids} == {32}
    assert len({i[:12] for i in ids}) < 1000, "some ids should share a millisecond"


def test_listing_is_newest_first_with_a_cursor_and_a_status_filter(database: Database) -> None:
    me = owner()
    created = [new_job(database, me) for _ in range(5)]
    new_job(database, owner())  # someone else's
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, created[1], me))
    seen, cursor = [], None
    for expected_size in (2, 2, 1):
        with database.session() as session:
            page, cursor = jobs.list_jobs(session, me, 2, cursor)
        assert len(page) == expected_size
        seen += [job.id for job in page]
    assert cursor is None and seen == created[::-1]
    with database.session() as session:
        page, cursor = jobs.list_jobs(session, me, 5)  # a last page that is full: no cursor to an empty one
    assert len(page) == 5 and cursor is None
    with database.session() as session:
        cancelled, _ = jobs.list_jobs(session, me, 10, statuses=[Status.CANCELLED])
    assert [job.id for job in cancelled] == [created[1]]


def test_cancel_stops_a_queued_job_at_once_and_asks_a_running_one(database: Database) -> None:
    me = owner()
    queued, running = new_job(database, me), new_job(database, me)
    start(database, running)
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, queued, me))
        jobs.request_cancel(session, jobs.get_job(session, running, me))
        asked = jobs.get_job(session, running, me).cancel_requested_at
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, running, me))  # asking twice is harmless
        assert jobs.get_job(session, running, me).cancel_requested_at == asked  # and changes nothing
    assert (status(database, queued), status(database, running)) == ("cancelled", "cancelling")
    with database.session() as session:  # the run goes on to its epoch's end, and says how far it is
        jobs.record_progress(session, running, 0, "student", 0.5, 3, 5)
    with database.session() as session:
        assert (jobs.get_job(session, running, me).epoch, jobs.get_job(session, running, me).progress) == (3, 0.5)
        assert jobs.stop_requested(session, running, 0)
        assert jobs.count_unfinished(session, me) == 1  # a cancelling job holds its worker: it counts to the cap
        job = jobs.get_job(session, running, me)
        assert job.cancel_requested_at is not None and job.finished_at is None


def test_a_finished_job_cannot_be_cancelled_and_an_unfinished_one_not_deleted(database: Database) -> None:
    me = owner()
    job_id = new_job(database, me)
    with database.session() as session, pytest.raises(jobs.InvalidTransition):
        jobs.delete_job(session, jobs.get_job(session, job_id, me))
    start(database, job_id)
    with database.session() as session:
        jobs.succeed(session, job_id, 0, {"after": {}}, OUTPUT)
    with database.session() as session, pytest.raises(jobs.InvalidTransition) as refused:
        jobs.request_cancel(session, jobs.get_job(session, job_id, me))
    assert refused.value.status == "succeeded"
    api = Database(database.url)  # a process that did not migrate: its connections take the cascade too
    with api.session() as session:
        jobs.delete_job(session, jobs.get_job(session, job_id, me))
    api.dispose()
    with database.session() as session:
        assert session.get(jobs.Job, job_id) is None
        assert session.query(jobs.Artifact).filter_by(job_id=job_id).count() == 0  # cascaded


def test_each_start_is_an_attempt_and_a_job_that_keeps_killing_workers_fails(database: Database) -> None:
    job_id = new_job(database, owner())
    first = start(database, job_id)
    assert first.inputs == {"model": "inputs/model", "clean_data": "inputs/clean_data"}
    assert taken_back(database, job_id, 0, max_attempts=2) == "queued"  # its worker died
    assert start(database, job_id, dispatch=1) is not None
    assert taken_back(database, job_id, 1, max_attempts=2) == "failed"  # and again: no third worker is taken down
    with database.session() as session:
        job = session.get(jobs.Job, job_id)
        assert (job.status, job.attempts, job.dispatch) == ("failed", 2, 1) and "at each of its 2 starts" in job.error
        assert "out of memory, the machine restarted, or the time limit reached while the database was out" in job.error
        assert job.finished_at is not None and jobs.count_unfinished(session, job.owner) == 0
    assert start(database, job_id, dispatch=2) is None


def test_the_out_of_attempts_message_counts_the_jobs_starts_not_the_setting(database: Database) -> None:
    """NAD_MAX_ATTEMPTS lowered while a job was queued again: it failed saying it was started once."""
    job_id = new_job(database, owner())
    start(database, job_id)
    assert taken_back(database, job_id, 0, max_attempts=2) == "queued"
    start(database, job_id, dispatch=1)
    assert taken_back(database, job_id, 1, max_attempts=1) == "failed"
    with database.session() as session:
        assert "before the job finished, at each of its 2 starts (" in session.get(jobs.Job, job_id).error


def test_a_copy_of_a_started_jobs_message_never_runs_it(database: Database) -> None:
    """A worker gives its message back when its pool process dies, and a broker hands a worker's unacknowledged
    message to another when their connection drops. The copy runs nothing and counts no attempt, whether the
    run's heartbeat is fresh or old: after a database outage every heartbeat is old, and a copy that took an
    old one for a dead run ran the job a second time beside it (the fault review). The sweeper, which looks
    twice, queues a dead run's job again."""
    job_id = new_job(database, owner())
    start(database, job_id)
    for seconds_ago in (5, 3600):
        with database.session() as session:
            session.get(jobs.Job, job_id).heartbeat_at = jobs.clock(session) - timedelta(seconds=seconds_ago)
        assert start(database, job_id) is None
        with database.session() as session:
            job = session.get(jobs.Job, job_id)
            assert (job.status, job.attempts, job.dispatch) == ("running", 1, 0)
    taken_back(database, job_id, 0)
    assert start(database, job_id, dispatch=1) is not None
    with database.session() as session:
        assert session.get(jobs.Job, job_id).attempts == 2


def test_a_start_tried_again_by_its_own_run_is_its_own_and_counts_once(database: Database) -> None:
    """A run whose start committed but whose answer was lost tries again: it finds the job started by itself and
    runs it, one attempt, even if a cancel came in between (its first stop check ends it). A copy of its
    message, or the run of a message the sweeper has since replaced, still runs nothing."""
    job_id, me = new_job(database, owner()), "this run"
    assert start(database, job_id, runner=me) is not None
    assert start(database, job_id, runner=me) == start(database, job_id, runner=me) is not None
    assert start(database, job_id) is None  # a copy
    with database.session() as session:
        jobs.request_cancel(session, session.get(jobs.Job, job_id))
    assert start(database, job_id, runner=me) is not None
    with database.session() as session:
        job = session.get(jobs.Job, job_id)
        assert (job.status, job.attempts, job.runner) == ("cancelling", 1, me)
    finished = new_job(database, owner())
    assert start(database, finished, runner=me) is not None
    with database.session() as session:
        jobs.fail(session, finished, 0, "failed")
    assert start(database, finished, runner=me) is None
    taken = new_job(database, owner())
    assert start(database, taken, runner=me) is not None
    taken_back(database, taken, 0)
    assert start(database, taken, runner=me) is None and start(database, taken, dispatch=1) is not None


def test_a_failure_for_a_place_ends_only_a_run_that_lives_there(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's main process knows of a run it kills only where it lived (`runner_place`): its failure ends
    the job if that run started it, and leaves a run elsewhere alone, of another pool process or another worker,
    be it a worker of the same node name in another container."""
    here, there = jobs.runner_place("celery@a", 4321), jobs.runner_place("celery@b", 4321)
    monkeypatch.setattr(jobs, "HOST", "another-container")
    assert jobs.runner_place("celery@a", 4321) != here
    monkeypatch.undo()
    assert len(jobs.runner_token("celery@a", 4321)) == 32 and jobs.runner_token("celery@a", 4321).startswith(here)
    assert jobs.runner_token("celery@a", 4321) != jobs.runner_token("celery@a", 4321)  # a pool process id recurs
    for node, pid, ends in [("celery@a", 4321, True), ("celery@a", 1234, False), ("celery@b", 4321, False)]:
        job_id = new_job(database, owner())
        assert start(database, job_id, runner=jobs.runner_token(node, pid)) is not None
        with database.session() as session:
            assert jobs.held_elsewhere(session, job_id, 0, here) is not ends
            assert jobs.held_elsewhere(session, job_id, 0, there) is ((node, pid) != ("celery@b", 4321))
            jobs.fail(session, job_id, 0, "the time limit", here)
        assert status(database, job_id) == ("failed" if ends else "running")
        with database.session() as session:
            assert not jobs.held_elsewhere(session, job_id, 1, there)  # another sending's files are not its
    older = new_job(database, owner())  # started by a worker older than the token
    assert start(database, older) is not None
    with database.session() as session:
        session.execute(update(jobs.Job).where(jobs.Job.id == older).values(runner=None))
    with database.session() as session:
        assert jobs.held_elsewhere(session, older, 0, here)
        jobs.fail(session, older, 0, "the time limit", here)
    assert status(database, older) == "running"


def test_a_cancel_while_a_worker_starts_the_job_waits_for_it_and_is_not_lost(database: Database) -> None:
    """The worker's read of the queued job and its update are one transaction that holds the row (PostgreSQL)
    or the database (SQLite, BEGIN IMMEDIATE): a cancel in between waits, then finds the job running and asks
    it to stop. On SQLite it was answered 'cancelled' and then overwritten by the start: the job ran."""
    me, other = owner(), Database(database.url)
    job_id, answered = new_job(database, me), []

    def cancel() -> None:
        with other.session() as session:
            job = jobs.get_job(session, job_id, me)
            jobs.request_cancel(session, job)
            answered.append(job.status)

    canceller = threading.Thread(target=cancel)
    with database.session() as session:
        assert jobs.start_attempt(session, job_id, 0, runner="a run") is not None
        canceller.start()
        canceller.join(1.0)
        assert answered == []  # held until the worker's transaction ends
    canceller.join(30)
    other.dispose()
    assert answered == ["cancelling"] and status(database, job_id) == "cancelling"


def test_a_migration_that_rebuilds_the_jobs_table_keeps_their_files(tmp_path: Path) -> None:
    """Batch mode rebuilds `jobs` on SQLite (downgrading 0002 does): with foreign keys on, dropping the old table
    deleted every artifact through ON DELETE CASCADE. `migrating` turns them off for the migration."""
    db = Database(f"sqlite:///{tmp_path / 'nad.db'}")
    db.migrate()
    job_id = new_job(db, owner())
    config = Config(str(MIGRATIONS / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS))
    with migrating(db.engine) as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    with db.engine.connect() as connection:
        files = connection.execute(text("SELECT count(*) FROM artifacts WHERE job_id = :id"), {"id": job_id})
        assert files.scalar() == len(INPUTS)
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # on again for the service
    db.migrate()  # and back up
    db.dispose()


def test_a_migration_that_leaves_files_of_no_job_is_rolled_back(tmp_path: Path) -> None:
    """With foreign keys off while it runs, a migration could leave artifacts whose job is gone; the check
    before its commit refuses it, and the database is as it was."""
    db = Database(f"sqlite:///{tmp_path / 'nad.db'}")
    db.migrate()
    job_id = new_job(db, owner())
    with pytest.raises(RuntimeError, match="foreign keys point nowhere"), migrating(db.engine) as connection:
        connection.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": job_id})
    assert status(db, job_id) == "queued"
    db.dispose()


def test_processes_migrating_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    """An API and its workers started together: each takes the write lock to migrate, the later ones find the
    schema made (they tried to make its tables again, and failed)."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    code = f"from core.database import Database; Database({url!r}).migrate()"
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], errors


def test_the_readiness_ping_is_not_held_by_a_writer_on_sqlite(tmp_path: Path) -> None:
    """Every SQLite transaction takes the write lock as it begins; the ping takes none, or /readyz called the
    database down (after the 10 s busy timeout) whenever a migration or a worker's write held the lock."""
    db = Database(f"sqlite:///{tmp_path / 'nad.db'}")
    db.migrate()
    writer = sqlite3.connect(tmp_path / "nad.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        db.ping()
        assert time.monotonic() - started < 5
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        db.dispose()


def test_timestamps_read_back_in_utc_whatever_the_servers_zone(database: Database) -> None:
    job_id = new_job(database, owner())
    with database.session() as session:
        if database.engine.dialect.name == "postgresql":
            session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))
        created = session.get(jobs.Job, job_id).created_at
    assert created.utcoffset() == timedelta(0) and created.tzinfo == UTC


def test_hosts_whose_clocks_disagree_keep_time_by_the_database(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API, a worker and its sweeper may run on three hosts. Stamped by their own clocks, a worker an
    hour behind beat an hour late by the sweeper's, which ran its live job a second time; an API an hour ahead
    recorded its jobs an hour ahead, and a lost message of theirs was not sent again for that hour."""
    db, me, on_time = Database(postgres_url), owner(), jobs.now
    try:
        db.migrate()
        monkeypatch.setattr(jobs, "now", lambda: on_time() + timedelta(hours=1))  # the API's host
        queued, running = new_job(db, me), new_job(db, me)
        monkeypatch.setattr(jobs, "now", lambda: on_time() - timedelta(hours=1))  # the worker's host
        start(db, running)
        with db.session() as session:
            assert jobs.heartbeat(session, running, 0)
        monkeypatch.undo()
        with db.session() as session:  # the sweeper's host
            since = jobs.clock(session) - timedelta(seconds=60)
            assert running not in dict(jobs.silent(session, QUEUE, since))
            assert queued in dict(jobs.waiting(session, QUEUE, jobs.clock(session) + timedelta(seconds=1)))
            assert abs(session.get(jobs.Job, running).heartbeat_at - on_time()) < timedelta(minutes=1)
    finally:
        db.dispose()


def test_a_job_write_reads_the_database_clock_once(postgres_url: str) -> None:
    """A running job writes its progress up to once a second: the clock's read and the update, no more (its
    stamps were two reads, a round trip each)."""
    db, statements = Database(postgres_url), []
    try:
        db.migrate()
        job_id = new_job(db, owner())
        start(db, job_id)
        event.listen(db.engine, "before_cursor_execute",
                     lambda _connection, _cursor, statement, *_: statements.append(statement.split()[0]))
        with db.session() as session:
            jobs.record_progress(session, job_id, 0, "teacher", 0.1, 1, 5)
        with db.session() as session:
            jobs.fail(session, job_id, 0, "it broke")
        with db.session() as session:
            job = session.get(jobs.Job, job_id)
    finally:
        db.dispose()
    assert statements[:4] == ["SELECT", "UPDATE", "SELECT", "UPDATE"]
    assert job.status == "failed" and job.finished_at == job.updated_at and job.heartbeat_at < job.finished_at


def test_a_redispatch_is_claimed_once_and_retires_the_old_message(database: Database) -> None:
    queued, running = new_job(database, owner()), new_job(database, owner())
    start(database, running)
    with database.session() as session:
        waiting = dict(jobs.waiting(session, QUEUE, jobs.now()))
        assert jobs.waiting(session, "another queue", jobs.now()) == []
        assert waiting.get(queued) == 0 and running not in waiting
        assert jobs.redispatch(session, queued, 0)
        assert not jobs.redispatch(session, queued, 0)  # another sweeper got there first
        assert not jobs.redispatch(session, running, 0)  # a started job is not re-sent
    assert start(database, queued, dispatch=0) is None  # the replaced message, turning up late
    assert status(database, queued) == "queued"
    assert start(database, queued, dispatch=1).job_id == queued


def test_a_silent_job_is_taken_from_its_dead_worker_once(database: Database) -> None:
    me = owner()
    running, cancelling, lively = new_job(database, me), new_job(database, me), new_job(database, me)
    for job_id in (running, cancelling, lively):
        start(database, job_id)
    with database.session() as session:
        jobs.record_progress(session, running, 0, "student", 0.5, 3, 5)
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, cancelling, me))
    since = jobs.now()
    with database.session() as session:
        assert jobs.heartbeat(session, lively, 0)
        assert {running, cancelling} <= dict(jobs.silent(session, QUEUE, since)).keys()
        assert lively not in dict(jobs.silent(session, QUEUE, since))
        assert jobs.silent(session, "another queue", since) == []
        assert jobs.recover(session, running, 0, since, max_attempts=3) == "queued"
        assert jobs.recover(session, running, 0, since, max_attempts=3) is None  # another sweeper got there first
        assert jobs.recover(session, cancelling, 0, since, max_attempts=3) == "cancelled"  # no message to send
        assert jobs.recover(session, lively, 0, since, max_attempts=3) is None
        assert jobs.stop_requested(session, running, 0)  # the old run, should it be alive, stops
        assert not jobs.heartbeat(session, running, 0)
    assert (status(database, running), status(database, cancelling), status(database, lively)) == (
        "queued", "cancelled", "running")
    with database.session() as session:  # queued again: none of the dead run's progress is shown
        job = session.get(jobs.Job, running)
        assert (job.stage, job.epoch, job.progress) == (None, None, 0.0)
    assert start(database, running, dispatch=1).job_id == running
    with database.session() as session:  # the old run, alive after all, stops and changes nothing of the new one's
        assert jobs.stop_requested(session, running, 0) and not jobs.stop_requested(session, running, 1)
        assert not jobs.heartbeat(session, running, 0)
        jobs.record_progress(session, running, 0, "student", 0.9, 4, 5)
        jobs.fail(session, running, 0, "from the old run")
        jobs.finish_cancelled(session, running, 0)
    with database.session() as session:
        job = session.get(jobs.Job, running)
        assert (job.status, job.dispatch, job.progress, job.error) == ("running", 1, 0.0, None)


def test_a_sweeper_that_found_a_job_silent_before_it_was_sent_again_leaves_its_next_run_alone(
    database: Database,
) -> None:
    """Two sweepers find the run of sending 0 silent; one sends the job again, a new run starts it and goes
    silent too (a database outage: every heartbeat is old). The other sweeper, acting on what it found of
    sending 0, must take nothing: queued again under dispatch 1 once more, the live run of sending 1 and the
    message sent anew would both run it."""
    job_id = new_job(database, owner())
    start(database, job_id)
    assert taken_back(database, job_id, 0) == "queued"
    start(database, job_id, dispatch=1)
    with database.session() as session:
        since = jobs.clock(session) + timedelta(seconds=1)
        for max_attempts in (3, 2):  # to be queued again, or failed out of attempts: neither
            assert jobs.recover(session, job_id, 0, since, max_attempts) is None
    with database.session() as session:
        job = session.get(jobs.Job, job_id)
        assert (job.status, job.dispatch, job.attempts, job.error) == ("running", 1, 2, None)


def test_a_cancelled_or_finished_job_is_not_run_again(database: Database) -> None:
    me = owner()
    cancelled, cancelling = new_job(database, me), new_job(database, me)
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, cancelled, me))
    start(database, cancelling)
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, cancelling, me))
    assert start(database, cancelled) is None and start(database, cancelling) is None
    assert status(database, cancelling) == "cancelling"  # its run stops at its next epoch, or the sweeper ends it


def test_success_registers_the_output_unless_a_cancel_came_first(database: Database) -> None:
    me = owner()
    done, late = new_job(database, me), new_job(database, me)
    for job_id in (done, late):
        start(database, job_id)
    with database.session() as session:
        jobs.request_cancel(session, jobs.get_job(session, late, me))
    with database.session() as session:
        assert jobs.succeed(session, done, 0, {"after": {"asr": 1.0}}, OUTPUT)
        assert not jobs.succeed(session, late, 0, {}, OUTPUT)
    with database.session() as session:
        job = jobs.get_job(session, done, me)
        assert job.status == "succeeded" and job.report == {"after": {"asr": 1.0}} and job.progress == 1.0
        assert job.artifact(jobs.OUTPUT).sha256 == "c" * 64
        assert jobs.get_job(session, late, me).artifact(jobs.OUTPUT) is None


def test_failure_keeps_the_message_for_the_owner(database: Database) -> None:
    job_id = new_job(database, owner())
    start(database, job_id)
    with database.session() as session:
        jobs.fail(session, job_id, 0, "the checkpoint does not fit wrn-16-1")
    with database.session() as session:
        job = session.get(jobs.Job, job_id)
        assert (job.status, job.error) == ("failed", "the checkpoint does not fit wrn-16-1")
        assert job.finished_at >= job.started_at
    cancelling = new_job(database, owner())  # a run that fails before its next stop check: failed, not cancelled
    start(database, cancelling)
    with database.session() as session:
        jobs.request_cancel(session, session.get(jobs.Job, cancelling))
    with database.session() as session:
        jobs.fail(session, cancelling, 0, "the checkpoint does not fit wrn-16-1")
    assert status(database, cancelling) == "failed"


def test_progress_is_written_at_most_once_a_second_but_always_at_epoch_ends(
    database: Database, worker_clock: StoodStill
) -> None:
    job_id = new_job(database, owner())
    start(database, job_id)
    record = ProgressRecorder(database, job_id, 0)

    def progress() -> tuple:
        with database.session() as session:
            job = session.get(jobs.Job, job_id)
            return job.stage, job.epoch, job.progress

    record(Event("teacher", 0.10, epoch=1, epochs=5, step=1))
    assert progress() == ("teacher", 1, 0.10)
    record(Event("teacher", 0.11, epoch=1, epochs=5, step=2))  # within a second: skipped
    assert progress() == ("teacher", 1, 0.10)
    record(Event("teacher", 0.20, epoch=1, epochs=5, loss=0.5, lr=0.01))  # the epoch's end
    assert progress() == ("teacher", 1, 0.20)
    record(Event("student", 0.21, epoch=1, epochs=5, step=1))  # a new stage
    assert progress() == ("student", 1, 0.21)
    worker_clock.now += 1.0
    record(Event("student", 0.22, epoch=1, epochs=5, step=2))
    assert progress() == ("student", 1, 0.22)


def test_a_refused_progress_write_is_not_tried_again_for_a_while(
    database: Database, monkeypatch: pytest.MonkeyPatch, worker_clock: StoodStill
) -> None:
    """The writes run in the training loop. Where the database hangs each try waits out the connect timeout,
    and tried at every step (an epoch's end is always written) they held a job to one step in 5 s (the second
    fault hunt)."""
    job_id = new_job(database, owner())
    start(database, job_id)
    record, tries = ProgressRecorder(database, job_id, 0), []

    def hanging(*args, **kwargs) -> None:
        tries.append(worker_clock.now)
        refused()

    monkeypatch.setattr(jobs, "record_progress", hanging)
    for epoch in range(1, 5):  # epoch ends, 10 s apart
        record(Event("student", epoch / 10, epoch=epoch, epochs=20, loss=0.5, lr=0.1))
        worker_clock.now += 10
    assert tries == [0.0, 30.0]


def test_keys_are_stored_hashed_checked_and_revocable(database: Database) -> None:
    with database.session() as session:
        key, secret = keys.create_key(session, "alice")
    assert secret.startswith(f"nad_{key.id}_") and key.secret_sha256 not in secret
    assert key.secret_sha256 == hashlib.sha256(secret.split("_", 2)[2].encode()).hexdigest()
    with database.session() as session:
        assert keys.authenticate(session, secret) == key.id
        assert keys.authenticate(session, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert keys.authenticate(session, "nad_nothing") is None and keys.authenticate(session, "") is None
        assert keys.authenticate(session, "xyz" + secret.removeprefix("nad")) is None  # the id and secret alone
        later, _ = keys.create_key(session, "bob")
    with database.session() as session:
        assert keys.revoke_key(session, key.id)
        assert not keys.revoke_key(session, key.id)
    with database.session() as session:
        assert keys.authenticate(session, secret) is None
        # by creation, a revoked key where it was (PostgreSQL keeps an updated row's new version at the end)
        assert [k.id for k in keys.list_keys(session) if k.id in (key.id, later.id)] == [key.id, later.id]


# ---- storage --------------------------------------------------------------------------------------------


def test_an_upload_is_hashed_and_never_written_past_the_cap(tmp_path: Path) -> None:
    storage, job_id = Storage(tmp_path), jobs.new_job_id()
    writer = storage.input_writer(job_id, "model", limit=10)
    writer.write(b"12345")
    with pytest.raises(TooLarge):
        writer.write(b"678901")
    assert (storage.incoming_dir(job_id) / "inputs/model").read_bytes() == b"12345"
    good = storage.input_writer(job_id, "clean_data", limit=10)
    good.write(b"abc")
    assert good.close().sha256 == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(FileExistsError):
        storage.input_writer(job_id, "clean_data", limit=10)


def test_a_received_upload_becomes_the_job_folder_and_paths_stay_inside_it(tmp_path: Path) -> None:
    storage, job_id = Storage(tmp_path), jobs.new_job_id()
    writer = storage.input_writer(job_id, "model", limit=10)
    writer.write(b"w")
    writer.close()
    storage.adopt(job_id)
    assert storage.path(job_id, "inputs/model").read_bytes() == b"w"
    assert not storage.incoming_dir(job_id).exists()
    for hostile in ("../other/inputs/model", "/etc/passwd", "inputs/../../x"):
        with pytest.raises(ValueError):
            storage.path(job_id, hostile)
    with pytest.raises(ValueError):
        storage.job_dir("../../etc")
    storage.remove(job_id)
    assert not storage.job_dir(job_id).exists()


def test_a_repeated_upload_takes_the_place_of_a_job_folder_once(tmp_path: Path) -> None:
    """A retry's upload moved in as the job's folder (`api.jobs._stand_in`) stays when the first upload, late,
    is moved too: the later one is discarded, not an error that would withdraw the job."""
    storage, first, retry = Storage(tmp_path), jobs.new_job_id(), jobs.new_job_id()
    for job_id, content in ((retry, b"retry"), (first, b"first")):
        writer = storage.input_writer(job_id, "model", limit=10)
        writer.write(content)
        writer.close()
    assert storage.adopt(retry, into=first)
    assert not storage.adopt(first)
    assert storage.path(first, "inputs/model").read_bytes() == b"retry"
    assert not storage.incoming_dir(first).exists() and not storage.job_dir(retry).exists()
    with pytest.raises(FileNotFoundError):  # an upload gone from incoming/ is a fault, folder in place or not
        storage.adopt(retry, into=first)


def test_a_runs_end_removes_earlier_outputs_but_the_recorded_one_and_never_a_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, job_id = Storage(tmp_path), jobs.new_job_id()
    storage.remove_outputs(job_id, through=3, keep=None)  # a job with no folder: nothing to do, no error
    (storage.job_dir(job_id) / "output").mkdir(parents=True)
    with monkeypatch.context() as deleted:  # the owner deletes the finished job as it is tidied
        deleted.setattr(Path, "iterdir", lambda folder: (_ for _ in ()).throw(FileNotFoundError(folder)))
        storage.remove_outputs(job_id, through=3, keep=None)
    for dispatch in range(5):
        storage.output_path(job_id, dispatch).parent.mkdir(parents=True)
        storage.output_path(job_id, dispatch).with_name(".tmpX7q2").write_bytes(b"half")
    storage.remove_outputs(job_id, through=3, keep=output_name(1))
    assert sorted(path.name for path in (storage.job_dir(job_id) / "output").iterdir()) == ["1", "4"]
    storage.remove_outputs(job_id, through=4, keep=None)  # ended with no output recorded: no empty folder left
    assert list(storage.job_dir(job_id).iterdir()) == []


def test_a_jobs_output_folder_that_is_a_link_leads_nothing_to_be_removed(tmp_path: Path) -> None:
    """This module makes no link: a job's output folder that is one (made by hand, or by a hostile process with
    access to the volume) is not read through, so neither a run's end nor `nad tidy` removes what it leads to."""
    storage, job_id = Storage(tmp_path / "storage"), jobs.new_job_id()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "0").mkdir(parents=True)
    (elsewhere / "0" / "precious").write_bytes(b"not the service's")
    storage.job_dir(job_id).mkdir(parents=True)
    (storage.job_dir(job_id) / "output").symlink_to(elsewhere)
    assert storage.unkept_outputs(job_id, None) == []
    storage.remove_outputs(job_id, through=3, keep=None)
    assert (elsewhere / "0" / "precious").read_bytes() == b"not the service's"
    (storage.job_dir(job_id) / "model").symlink_to(elsewhere / "0" / "precious")  # nor is a file's sized through
    assert size_of(storage.job_dir(job_id)) == (storage.job_dir(job_id) / "model").lstat().st_size


def test_every_file_the_api_takes_reaches_the_engine_by_its_role(tmp_path: Path) -> None:
    """The API stores each upload under its field's name and the worker maps the names to the engine's
    files: a name the two spelt differently would be stored and never read."""
    from api.uploads import FILE_FIELDS
    from worker.tasks import job_files

    storage, job_id = Storage(tmp_path), jobs.new_job_id()
    inputs = {role: f"inputs/{role}" for role in FILE_FIELDS}
    files = job_files(storage, jobs.Assignment(job_id, 0, {}, inputs))
    assert (files.checkpoint, files.clean_data, files.test_data, files.poison_data, files.teacher) == tuple(
        storage.path(job_id, inputs[role]) for role in ("model", "clean_data", "test_data", "poison_data", "teacher"))
    assert len(FILE_FIELDS) == 5 and files.out == storage.output_path(job_id, 0)


# A process that dies, as under kill -9, while it receives an upload.
DIES_MID_UPLOAD = """
import os, signal, sys
from pathlib import Path
from core.storage import Storage
Storage(Path(sys.argv[1])).input_writer(sys.argv[2], "model", limit=10).write(b"12")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sweeping_removes_only_stale_incoming_uploads(tmp_path: Path) -> None:
    """Stale means its receiving process is dead, however young the upload: a live replica's stays."""
    live = Storage(tmp_path)
    receiving = live.input_writer(jobs.new_job_id(), "model", limit=10)
    receiving.write(b"1")
    died = subprocess.run([sys.executable, "-c", DIES_MID_UPLOAD, str(tmp_path), jobs.new_job_id()], cwd=ROOT)
    assert died.returncode == -signal.SIGKILL
    unlocked = tmp_path / "incoming" / jobs.new_job_id() / "inputs/model"  # a layout without locks
    unlocked.parent.mkdir(parents=True)
    unlocked.write_bytes(b"1")
    assert len(list((tmp_path / "incoming").iterdir())) == 3
    assert Storage(tmp_path).sweep_incoming() == 2
    assert list((tmp_path / "incoming").iterdir()) == [live.inbox()]
    assert (live.inbox() / LOCK_FILE).exists() and receiving.close().size == 1


def test_a_lock_won_on_a_folder_swept_meanwhile_is_not_taken_for_an_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweeper removes a dead process's folder while it holds its lock: a process that opened that lock file
    just before wins the lock once it is released, on a file no longer there, and must claim another folder,
    not receive uploads in the one removed."""
    import fcntl

    flock, swept = fcntl.flock, []

    def swept_first(fd: int, operation: int) -> None:
        if not swept:  # the sweeper's rmtree between this process's open and its lock
            folder = next((tmp_path / "incoming").iterdir())
            shutil.rmtree(folder)
            swept.append(folder)
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", swept_first)
    storage = Storage(tmp_path)
    inbox = storage.inbox()
    assert swept and inbox != swept[0] and (inbox / LOCK_FILE).is_file()
    writer = storage.input_writer(jobs.new_job_id(), "model", limit=10)
    writer.write(b"1")
    assert writer.close().size == 1


def storage_command(name: str, nad_environment, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple]:
    """`nad NAME ARGS` against the database at `url` and the storage `root`: its exit code, stdout and stderr."""

    def run(url: str, root: Path, *args: str) -> tuple[int, str, str]:
        nad_environment(NAD_DATABASE_URL=url, NAD_STORAGE_DIR=str(root))
        code = main([name, *args])
        return code, *capsys.readouterr()

    return run


@pytest.fixture
def tidy(nad_environment, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple]:
    return storage_command("tidy", nad_environment, capsys)


def test_nad_tidy_lists_then_removes_the_folders_whose_job_is_gone_and_no_other(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tidy
) -> None:
    """A job is removed from the database before its files: an API killed between the two (a DELETE, a
    submission withdrawn) left a folder no job owns. More folders than one query looks up, the recorded job's
    in the last lookup; a job submitted while tidy runs is left alone."""
    storage, who, url = Storage(tmp_path / "storage"), owner(), database.engine.url.render_as_string(False)

    def stored(job_id: str) -> str:
        storage.path(job_id, "inputs/model").parent.mkdir(parents=True)
        storage.path(job_id, "inputs/model").write_bytes(b"123")
        return job_id

    lost = [stored(jobs.new_job_id()) for _ in range(jobs.IDS_PER_QUERY)]  # older ids than the jobs': first
    deleted, withdrawn, kept = (stored(new_job(database, who)) for _ in range(3))
    with database.session() as session:
        jobs.request_cancel(session, session.get(jobs.Job, deleted))
        jobs.delete_job(session, session.get(jobs.Job, deleted))
        jobs.withdraw(session, withdrawn)
    (storage.root / "jobs" / "not-a-job").mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inputs").mkdir(parents=True)
    (storage.root / "jobs" / jobs.new_job_id()).symlink_to(elsewhere)  # named as a job, made by no job
    code, out, _ = tidy(url, storage.root)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[:-1]] == [*lost, deleted, withdrawn]
    assert out.startswith(f"{lost[0]}  ") and out.splitlines()[0].endswith(" 3 bytes")
    assert "502 folders, 1,506 bytes whose job is gone, and 0 output folders, 0 bytes their finished job did not " \
           "record (503 job folders in" in out
    assert storage.job_ids() == sorted([*lost, deleted, withdrawn, kept])  # listing removes nothing

    submitted = []
    job_ids = Storage.job_ids

    def a_submission_lands_as_it_lists(self: Storage) -> list[str]:  # recorded, then moved in (`api.jobs`)
        listed = job_ids(self)
        submitted.append(stored(new_job(database, who)))
        return listed

    monkeypatch.setattr(Storage, "job_ids", a_submission_lands_as_it_lists)
    code, out, _ = tidy(url, storage.root, "--remove")
    assert code == 0 and out.splitlines()[-1].startswith("removed 502 folders, 1,506 bytes")
    monkeypatch.undo()
    assert storage.job_ids() == sorted([kept, *submitted]) and (storage.root / "jobs" / "not-a-job").is_dir()
    assert storage.path(kept, "inputs/model").read_bytes() == b"123" and (elsewhere / "inputs").is_dir()
    code, out, _ = tidy(url, storage.root)
    assert code == 0 and out.startswith("every folder has its job, and every finished job only the output it "
                                        "recorded (2 job folders")


def test_nad_tidy_lists_then_removes_the_output_folders_a_finished_job_did_not_record(
    database: Database, tmp_path: Path, tidy
) -> None:
    """A worker's process killed at the hard time limit as it wrote a checkpoint may make its output folder again
    after the job's failure removed it, and no run of the job removes it then. A finished job's unrecorded
    output folders go; its recorded output, a running job's and a folder no run makes stay."""
    storage, who, url = Storage(tmp_path / "storage"), owner(), database.engine.url.render_as_string(False)

    def written(job_id: str, dispatch: int) -> None:
        storage.output_path(job_id, dispatch).parent.mkdir(parents=True)
        storage.output_path(job_id, dispatch).write_bytes(b"12345")

    failed, succeeded, running = sorted(new_job(database, who) for _ in range(3))
    for job_id in (failed, succeeded, running):
        start(database, job_id)
        written(job_id, 0)
    written(succeeded, 1)
    for named_otherwise in ("notes", "²", "007"):  # "²" is a digit to str.isdigit, "007" no run's name
        (storage.job_dir(failed) / "output" / named_otherwise).mkdir()
    (storage.job_dir(failed) / "output" / "7").write_bytes(b"a file")  # none of the service's: left alone,
    (tmp_path / "elsewhere" / "8").mkdir(parents=True)  # as is a link, and what it leads to
    (storage.job_dir(failed) / "output" / "8").symlink_to(tmp_path / "elsewhere" / "8")
    with database.session() as session:
        jobs.fail(session, failed, 0, "the time limit")
        jobs.succeed(session, succeeded, 0, {"after": {}}, OUTPUT)
    code, out, _ = tidy(url, storage.root)
    assert code == 0 and out.splitlines()[:-1] == [f"{failed}/output/0  {5:>15,} bytes",
                                                   f"{succeeded}/output/1  {5:>15,} bytes"]
    assert "0 folders, 0 bytes whose job is gone, and 2 output folders, 10 bytes their finished job did not " \
           "record (3 job folders in" in out
    assert storage.unkept_outputs(failed, None) == [storage.job_dir(failed) / "output" / "0"]  # listing removes none
    code, out, _ = tidy(url, storage.root, "--remove")
    assert code == 0 and out.splitlines()[-1].startswith("removed 0 folders, 0 bytes whose job is gone, and 2 ")
    assert storage.unkept_outputs(failed, None) == []
    assert all((storage.job_dir(failed) / "output" / name).is_dir() for name in ("notes", "²", "007"))
    assert (storage.job_dir(failed) / "output" / "7").is_file() and (tmp_path / "elsewhere" / "8").is_dir()
    assert storage.unkept_outputs(succeeded, None) == [storage.job_dir(succeeded) / "output" / "0"]
    assert storage.output_path(running, 0).read_bytes() == b"12345"
    code, out, _ = tidy(url, storage.root)
    assert code == 0 and out.startswith("every folder has its job, and every finished job only the output it ")


def test_nad_tidy_looks_up_every_job_however_the_folders_fall_into_queries(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folders' ids are looked up IDS_PER_QUERY at a time: one left out of every lookup would be a job's
    folder taken for one without a job (and removed with `--remove`), or a finished job's output not judged."""
    who, lost = owner(), jobs.new_job_id()
    recorded = [new_job(database, who) for _ in range(5)]
    for job_id in recorded[:3]:
        start(database, job_id)
        with database.session() as session:
            jobs.fail(session, job_id, 0, "failed")
    monkeypatch.setattr(jobs, "IDS_PER_QUERY", 2)
    with database.session() as session:
        assert jobs.unrecorded(session, [lost, *recorded]) == [lost]
        assert jobs.finished_outputs(session, [lost, *recorded]) == dict.fromkeys(recorded[:3])


def test_nad_tidy_keeps_the_output_of_a_job_whatever_inputs_it_has(database: Database, tmp_path: Path, tidy) -> None:
    """A succeeded job's recorded output is looked up among its files by role: a job with more inputs than the
    model and clean data (test data, a teacher, poisoned data) keeps its output as one without them does."""
    storage, url = Storage(tmp_path / "storage"), database.engine.url.render_as_string(False)
    roles = ("model", "clean_data", "test_data", "poison_data", "teacher")
    job_id = jobs.new_job_id()
    with database.session() as session:
        jobs.create_job(session, job_id, owner(), QUEUE, {"arch": "wrn-16-1"},
                        [FileRecord(role, f"inputs/{role}", 1, "a" * 64) for role in roles])
    start(database, job_id)
    storage.output_path(job_id, 0).parent.mkdir(parents=True)
    storage.output_path(job_id, 0).write_bytes(b"12345")
    with database.session() as session:
        assert jobs.succeed(session, job_id, 0, {"after": {}}, OUTPUT)
        assert jobs.finished_outputs(session, [job_id]) == {job_id: OUTPUT.path}
    code, out, _ = tidy(url, storage.root, "--remove")
    assert code == 0 and out.startswith("removed 0 folders, 0 bytes whose job is gone, and 0 output folders")
    assert storage.output_path(job_id, 0).read_bytes() == b"12345"


def test_nad_tidy_refuses_a_database_that_cannot_be_the_apis(database: Database, tmp_path: Path, tidy) -> None:
    """Every folder would be ownerless there: a relative SQLite path read from another folder names a file that
    is not there (not made), one `nad keys` made holds no job (not believed while folders exist), and a
    database without the jobs table is not migrated."""
    storage = Storage(tmp_path / "storage")
    storage.path(jobs.new_job_id(), "inputs/model").parent.mkdir(parents=True)
    missing = tmp_path / "elsewhere" / "nad.db"
    code, _, err = tidy(f"sqlite:///{missing}", storage.root, "--remove")
    assert code == 2 and f"there is no SQLite file at '{missing}'" in err and not missing.parent.exists()
    empty = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    empty.migrate()
    empty.dispose()
    code, _, err = tidy(f"sqlite:///{tmp_path / 'keys.db'}", storage.root, "--remove")
    assert code == 2 and f"it has no job at all, and {storage.root / 'jobs'} holds 1 job folder: " in err
    sqlite3.connect(tmp_path / "bare.db").close()
    code, _, err = tidy(f"sqlite:///{tmp_path / 'bare.db'}", storage.root, "--remove")
    assert code == 2 and "it has no jobs table: " in err and "is not the service's database" in err
    assert len(storage.job_ids()) == 1
    code, out, _ = tidy(database.engine.url.render_as_string(False), tmp_path / "no storage yet")
    assert code == 0 and out.startswith("every folder has its job, and every finished job only the output it "
                                        "recorded (0 job folders")


def test_nad_tidy_says_which_folders_it_could_not_remove(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tidy
) -> None:
    storage = Storage(tmp_path / "storage")
    stuck = jobs.new_job_id()
    storage.path(stuck, "inputs/model").parent.mkdir(parents=True)
    new_job(database, owner())  # the database holds jobs
    monkeypatch.setattr(shutil, "rmtree", lambda folder, ignore_errors: None)  # as it does where it may not
    code, out, err = tidy(database.engine.url.render_as_string(False), storage.root, "--remove")
    assert code == 2 and out.startswith(stuck) and "removed" not in out
    assert f"1 of 1 folder listed could not be removed ({storage.job_dir(stuck)} first)" in err


@pytest.fixture(params=["sqlite", "postgresql"])
def own_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated job database of the test's own, on each backend: `nad expire` acts on every key's jobs, and
    the session's PostgreSQL database holds other tests'."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'own.db'}"
        db = Database(url)
        db.migrate()
        yield db
        db.dispose()
        return
    from service_fixtures import fresh_postgres

    databases = fresh_postgres()
    db = Database(next(databases))
    db.migrate()
    yield db
    db.dispose()
    next(databases, None)  # its DROP DATABASE: close() would skip it


@pytest.fixture
def expire(nad_environment, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple]:
    return storage_command("expire", nad_environment, capsys)


def test_nad_expire_lists_then_deletes_every_keys_jobs_finished_before_its_days_and_no_other(
    own_database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expire
) -> None:
    """Jobs of two keys that succeeded, failed and were cancelled ten days ago go, row and files, oldest first;
    one that finished two days ago, one running since then and one queued stay. One its owner deletes while the
    command runs is no failure."""
    db, storage = own_database, Storage(tmp_path / "storage")
    url = db.engine.url.render_as_string(False)
    first, second = owner(), owner()
    succeeded, failed, cancelled, deleted, recent, running, queued = (
        new_job(db, who) for who in (first, second, first, second, first, second, first))
    for job_id in (succeeded, failed, deleted, recent, running):
        start(db, job_id)
    with db.session() as session:
        jobs.succeed(session, succeeded, 0, {"after": {}}, OUTPUT)
        jobs.fail(session, failed, 0, "an input error")
        jobs.request_cancel(session, session.get(jobs.Job, cancelled))
        jobs.succeed(session, deleted, 0, {"after": {}}, OUTPUT)
        jobs.succeed(session, recent, 0, {"after": {}}, OUTPUT)
    long_ago = jobs.now() - timedelta(days=10)
    with db.session() as session:
        for hours, job_id in enumerate((failed, cancelled, succeeded, deleted)):  # the order they finished in
            session.execute(update(jobs.Job).where(jobs.Job.id == job_id)
                            .values(finished_at=long_ago + timedelta(hours=hours)))
        session.execute(update(jobs.Job).where(jobs.Job.id == recent)
                        .values(finished_at=jobs.now() - timedelta(days=2)))
        session.execute(update(jobs.Job).values(created_at=long_ago - timedelta(days=1)))
    every = (succeeded, failed, cancelled, deleted, recent, running, queued)
    for size, job_id in enumerate(every, start=1):
        storage.path(job_id, "inputs/model").parent.mkdir(parents=True)
        storage.path(job_id, "inputs/model").write_bytes(b"x" * size)

    code, out, _ = expire(url, storage.root, "--days", "7")
    lines = out.splitlines()
    assert code == 0 and [line.split()[:2] for line in lines[:-1]] == [
        [failed, "failed"], [cancelled, "cancelled"], [succeeded, "succeeded"], [deleted, "succeeded"]]
    assert lines[0] == f"{failed}  failed     finished {long_ago:%Y-%m-%d %H:%M} UTC  {2:>15,} bytes"
    assert lines[-1].startswith("4 jobs finished before ") and ", 10 bytes (" in lines[-1]
    assert lines[-1].endswith("; `nad expire --days 7 --remove` deletes them")
    assert storage.job_ids() == sorted(every)  # listing deletes nothing

    forget_finished, forgotten = jobs.forget_finished, []

    def its_owner_deletes_one_meanwhile(session, job_id: str) -> bool:
        if job_id == deleted:  # DELETE /jobs/{id} (jobs.delete_job calls this), between the listing and this
            with db.session() as other:
                assert forget_finished(other, deleted)
            storage.remove(deleted)
        forgotten.append(forget_finished(session, job_id))
        return forgotten[-1]

    monkeypatch.setattr(jobs, "forget_finished", its_owner_deletes_one_meanwhile)
    code, out, err = expire(url, storage.root, "--days", "7", "--remove")
    assert code == 0 and err == "" and out.splitlines()[-1].startswith("deleted 3 jobs finished before ")
    assert ", 6 bytes (" in out.splitlines()[-1]  # not the 4 bytes of the job its owner deleted
    assert forgotten == [True, True, True, False]
    assert storage.job_ids() == sorted([recent, running, queued])
    with db.session() as session:
        assert sorted(session.scalars(select(jobs.Job.id))) == sorted([recent, running, queued])
        assert set(session.scalars(select(jobs.Artifact.job_id))) == {recent, running, queued}  # no orphans
    code, out, _ = expire(url, storage.root, "--days", "1.5")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()[:-1]] == [[recent, "succeeded"]]
    for remove in ((), ("--remove",)):
        code, out, _ = expire(url, storage.root, "--days", "2.5", *remove)
        assert code == 0 and out.startswith("no job finished before ")


def test_nad_expire_says_which_files_it_could_not_remove_and_refuses_what_cannot_be_the_apis(
    own_database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expire
) -> None:
    """A storage folder that holds none of the jobs' folders is not the API's: deleting their records there would
    leave their files with no record, which `nad tidy` then cannot judge."""
    db, storage = own_database, Storage(tmp_path / "storage")
    job_id = new_job(db, owner())
    with db.session() as session:
        jobs.request_cancel(session, session.get(jobs.Job, job_id))
        session.execute(update(jobs.Job).values(finished_at=jobs.now() - timedelta(days=2)))
    storage.path(job_id, "inputs/model").parent.mkdir(parents=True)
    code, _, err = expire(db.engine.url.render_as_string(False), tmp_path / "another storage", "--days", "1",
                          "--remove")
    assert code == 2 and "none of the 1 job finished before " in err and f"has its folder in " \
        f"{tmp_path / 'another storage' / 'jobs'}: NAD_STORAGE_DIR must be the API's; nothing was deleted" in err
    with db.session() as session:
        assert session.get(jobs.Job, job_id)  # its record kept, with the files it names
    monkeypatch.setattr(Storage, "remove", lambda self, job_id: None)  # as a folder of another owner's would
    code, _, err = expire(db.engine.url.render_as_string(False), storage.root, "--days", "1", "--remove")
    assert code == 2 and f"1 of the 1 job deleted kept their files ({job_id} first): check their owner and " \
        "permissions, then `nad tidy --remove`" in err
    missing = tmp_path / "elsewhere" / "nad.db"
    code, _, err = expire(f"sqlite:///{missing}", storage.root, "--days", "1")
    assert code == 2 and f"there is no SQLite file at '{missing}': " in err and not missing.parent.exists()
    monkeypatch.chdir(tmp_path)
    code, _, err = expire("sqlite:///var/nad.db", storage.root, "--days", "1")
    assert code == 2 and f"there is no SQLite file at 'var/nad.db' (read from {tmp_path}, as a relative path is): " \
        in err and not (tmp_path / "var").exists()


@pytest.mark.parametrize("days", ["0", "-1", "soon", "nan", "1e9"])
def test_nad_expire_takes_only_a_number_of_days_above_0(days: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_code:
        main(["expire", "--days", days])
    assert exit_code.value.code == 2
    assert f"{days!r} is not a number of days above 0 and below 100000" in capsys.readouterr().err


def test_a_time_in_another_zone_is_stored_and_compared_as_the_same_instant(database: Database) -> None:
    """SQLite keeps a time's digits without its zone: 12:00+05:30 written as such would read back as 12:00 UTC,
    five and a half hours late, and compare so too (`nad expire`'s cutoff, the sweeper's heartbeat checks)."""
    job_id = new_job(database, owner())
    kolkata = timezone(timedelta(hours=5, minutes=30))
    finished = datetime(2026, 1, 1, 12, 0, tzinfo=kolkata)
    with database.session() as session:
        jobs.request_cancel(session, session.get(jobs.Job, job_id))
        session.execute(update(jobs.Job).where(jobs.Job.id == job_id).values(finished_at=finished))
    with database.session() as session:
        assert session.get(jobs.Job, job_id).finished_at == finished
        assert session.get(jobs.Job, job_id).finished_at.tzinfo == UTC
        just_after, just_before = (finished + timedelta(minutes=sign) for sign in (1, -1))
        assert job_id in [row[0] for row in jobs.finished_before(session, just_after.astimezone(UTC))]
        assert job_id not in [row[0] for row in jobs.finished_before(session, just_before.astimezone(UTC))]
