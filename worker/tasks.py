"""The sanitization task. It receives a job id only: parameters and files come from the database and the
storage folder, so a message carries nothing a client wrote, and a redelivered message runs the same job."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TypeVar

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core import jobs
from core.database import Database
from core.engine.checkpoints import sha256_file
from core.engine.errors import Cancelled, InputError
from core.engine.events import Event
from core.engine.sanitize import JobFiles, sanitize
from core.params import SanitizeParams
from core.settings import get_settings
from core.storage import Storage, output_name
from worker.app import app
from worker.dispatch import SANITIZE

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds between two progress writes within one stage; epoch ends and stage changes are always written.
PROGRESS_INTERVAL = 1.0
# Seconds no progress is written after a write the database refused. The writes run in the training loop: where
# the database hangs, each try waited out the connect timeout, and a job trained one step every 5 s.
PROGRESS_BACKOFF = 30.0
# What the engine is told it has is the job's time limit less a reserve for what follows its last candidate
# (writing and hashing the checkpoints, recording the job): `auto` stops candidates so that the last one is
# measured by its deadline, and a soft limit reached while the result is written would fail the whole job.
# Seconds for a checkpoint of a few hundred megabytes, capped at a share of a short limit.
FINISH_RESERVE = 60.0
FINISH_RESERVE_SHARE = 0.05
# Seconds a job's start and its last write (its result, cancel or failure) are tried again while the database
# is out, and the longest pause between two tries. The job's heartbeat beats through the last write, so no
# sweeper takes a finished job from its worker; after 15 s, as it once gave up, a job that had trained failed.
FINAL_WRITE_PATIENCE = 600.0
FINAL_WRITE_PAUSE = 15.0
# Seconds the main process's failure of a run at the hard time limit waits for a lock on the job's row.
MAIN_PROCESS_LOCK_WAIT = 5.0


@cache
def database() -> Database:
    """This process's connection pool, made on first use: in the child process that runs jobs, never
    inherited through a fork."""
    return Database(get_settings().database_url)


class ProgressRecorder:
    """Writes the engine's events to the job's row, sparingly: a step event every few milliseconds would
    otherwise mean as many database writes. A write the database refuses (a restart, a failover) is skipped,
    and none is tried for PROGRESS_BACKOFF: hours of training are not thrown away, nor slowed, for a progress
    bar."""

    def __init__(self, db: Database, job_id: str, dispatch: int) -> None:
        self.db, self.job_id, self.dispatch = db, job_id, dispatch
        self.stage: str | None = None
        self.written_at = float("-inf")
        self.failed_at = float("-inf")
        self.failing = False  # a traceback for the first refused write of an outage, not for each

    def __call__(self, event: Event) -> None:
        epoch_end = event.epoch is not None and event.step is None
        now = time.monotonic()
        if now - self.failed_at < PROGRESS_BACKOFF:
            return
        if event.stage == self.stage and not epoch_end and now - self.written_at < PROGRESS_INTERVAL:
            return
        try:
            with self.db.session() as session:
                jobs.record_progress(session, self.job_id, self.dispatch, event.stage, event.progress, event.epoch,
                                     event.epochs)
        except OperationalError:
            log.warning("job %s: progress not recorded; tried again in %.0f s", self.job_id, PROGRESS_BACKOFF,
                        exc_info=not self.failing)
            self.failed_at, self.failing = time.monotonic(), True  # after the try, which may have hung
            return
        self.stage, self.written_at, self.failing = event.stage, now, False


@contextmanager
def heartbeat(db: Database, job_id: str, dispatch: int, interval: float) -> Iterator[None]:
    """Tell the database every `interval` seconds that the job's process lives, from a thread: the engine's
    own events stop for minutes while it loads or evaluates. The sweeper requeues a job that two of its rounds
    in a row find silent for longer than its interval (`worker.dispatch`)."""
    stop = threading.Event()

    def beat() -> None:
        failing = False  # a traceback for the first failure of an outage, not for each
        while not stop.wait(interval):
            try:
                with db.session() as session:
                    jobs.heartbeat(session, job_id, dispatch)
                failing = False
            except Exception:
                log.warning("job %s: heartbeat failed; the next one tries again", job_id, exc_info=not failing)
                failing = True

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # Not waited for longer than a beat: one stuck on a stalled server would hold the job's process until
        # the hard time limit. A beat that lands late changes nothing, the job no longer running.
        thread.join(timeout=interval)


class MissingInput(Exception):
    """An upload of the job is gone from storage (removed by hand, or a volume not mounted): not the owner's
    fault, and not a bug to hide behind the generic message either."""

    def __init__(self, role: str) -> None:
        super().__init__(f"{role} is missing")
        self.role = role


def _check_inputs(storage: Storage, assignment: jobs.Assignment) -> None:
    """MissingInput for the first upload of the job that is not in storage, before the engine spends minutes
    on the others and then fails on a server path."""
    for role, relative in assignment.inputs.items():
        if not storage.path(assignment.job_id, relative).is_file():
            raise MissingInput(role)


def job_files(storage: Storage, assignment: jobs.Assignment) -> JobFiles:
    """The engine's view of a job's files, from the paths the API recorded."""

    def path(role: str) -> Path | None:
        relative = assignment.inputs.get(role)
        return storage.path(assignment.job_id, relative) if relative else None

    return JobFiles(checkpoint=path("model"), clean_data=path("clean_data"), test_data=path("test_data"),
                    poison_data=path("poison_data"), teacher=path("teacher"),
                    out=storage.output_path(assignment.job_id, assignment.dispatch))


class SanitizeRequest(Request):
    """A job's message as the worker's main process holds it while a pool process runs it. Unlike the task, it
    knows that process, and so where the run drew its token (`jobs.runner_place`)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """At the hard time limit Celery calls the task's `on_failure` here, in the main process, without saying
        which pool process it is about to kill; the failure is written here instead, for that process's run
        only. That run may never have started the job: a copy of a live run's message, killed as its start
        waited on a stalled database server, must leave the live run and its checkpoint alone."""
        super().on_timeout(soft, timeout)
        if not soft and not worker_state.should_terminate:  # Celery's own condition: none at a cold shutdown
            job_id, dispatch = self.args
            _fail_run(job_id, dispatch, TimeLimitExceeded(timeout), self.hostname, self.worker_pid,
                      lock_wait=MAIN_PROCESS_LOCK_WAIT)


class SanitizeTask(Task):
    Request = SanitizeRequest

    def on_failure(self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: object) -> None:
        """What escaped the task in its pool process: a database that failed as the job ended. The job is
        failed, if this run started it, rather than left running forever. The hard time limit's failure, which
        Celery also reports here, is `SanitizeRequest`'s."""
        if isinstance(exc, TimeLimitExceeded):
            return
        job_id, dispatch = args
        _fail_run(job_id, dispatch, exc, self.request.hostname, os.getpid())


def _fail_run(job_id: str, dispatch: int, error: Exception, node: str | None, pid: int,
              lock_wait: float | None = None) -> None:
    """Fail the job for `error` if the run in pool process `pid` of worker `node` holds it, and remove what the
    job's runs left in storage unless another run holds it. A connection of its own: the main process must not
    open the cached pool its future children would inherit. Tried once: the main process receives the worker's
    messages, and a job whose failure a database outage keeps from being written is silent, so the sweeper takes
    it. Never raises: Celery, or billiard in the main process, would log the error without the job it was for."""
    settings = get_settings()
    db = Database(settings.database_url)
    try:
        place = jobs.runner_place(node, pid)
        message = _failure(job_id, error, settings.job_time_limit)

        def failing(session: Session) -> None:
            if lock_wait is not None:
                _bound_lock_waits(session, lock_wait)
            jobs.fail(session, job_id, dispatch, message, place)

        _end(db, Storage(settings.storage_dir), job_id, dispatch, failing, patience=0.0, place=place)
    except Exception:
        log.exception("job %s: its failure could not be recorded; the sweeper takes the job once silent", job_id)
    finally:
        db.dispose()


@app.task(name=SANITIZE, base=SanitizeTask, bind=True)
def sanitize_job(self: SanitizeTask, job_id: str, dispatch: int) -> None:
    """Run one job to its end: succeeded, failed or cancelled, as recorded in the database. `dispatch` says
    which sending of the job this message is (`worker.dispatch`)."""
    started = time.monotonic()  # Celery's time limits count from here
    settings = get_settings()
    db = database()
    # This run's, not the message's: a copy of the message runs under another
    runner = jobs.runner_token(self.request.hostname, os.getpid())
    try:  # within half the time limit: the soft limit, reached here, would be the task's error
        assignment = _patiently(db, job_id, lambda session: jobs.start_attempt(session, job_id, dispatch, runner),
                                min(FINAL_WRITE_PATIENCE, settings.job_time_limit / 2))
    except (OperationalError, SoftTimeLimitExceeded) as error:
        # Nothing of the job ran here, so nothing of it is failed or removed (`on_failure` would: this message may
        # copy a live run's). The message goes back to the queue, for when the database answers again.
        log.warning("job %s: the database refused its start; its message goes back to the queue", job_id)
        raise Reject(error, requeue=True) from error
    if assignment is None:
        log.info("job %s: nothing to run (started already, cancelled, deleted, finished or sent again)", job_id)
        return
    log.info("job %s: started", job_id)
    storage = Storage(settings.storage_dir)
    files = job_files(storage, assignment)
    # The heartbeat beats through the job's last write too, which may be tried for minutes while the database
    # is out: a silent job would be taken from its worker meanwhile and run again.
    with heartbeat(db, job_id, dispatch, settings.sweep_interval / 4):
        try:
            _check_inputs(storage, assignment)
            params = SanitizeParams.model_validate(assignment.params)
            report = sanitize(files, params, ProgressRecorder(db, job_id, dispatch),
                              lambda: _stop_requested(db, job_id, dispatch), max_images=settings.max_images,
                              time_limit=engine_time(settings.job_time_limit, time.monotonic() - started))
            _record_success(db, storage, job_id, dispatch, report, files.out)
        except Cancelled:
            _end(db, storage, job_id, dispatch, lambda session: jobs.finish_cancelled(session, job_id, dispatch))
            log.info("job %s: cancelled (or given to another worker)", job_id)
        except Exception as error:
            if not _still_runs(db, job_id, dispatch):  # what it hit (its folder removed, say) is no bug
                log.warning("job %s: this run failed after the job was taken from it (ended by the sweeper, or "
                            "sent again)", job_id, exc_info=error)
                _end(db, storage, job_id, dispatch, lambda session: None)  # no word to write: only the tidying
                return
            message = _failure(job_id, error, settings.job_time_limit)
            _end(db, storage, job_id, dispatch, lambda session: jobs.fail(session, job_id, dispatch, message))


def engine_time(limit: float, elapsed: float) -> float:
    """The seconds the engine may spend of a job with time limit `limit` that started `elapsed` seconds ago:
    what is left, less the reserve for finishing."""
    return limit - elapsed - min(FINISH_RESERVE, FINISH_RESERVE_SHARE * limit)


def _end(db: Database, storage: Storage, job_id: str, dispatch: int, write: Callable[[Session], T],
         patience: float = FINAL_WRITE_PATIENCE, place: str | None = None) -> T:
    """Write the job's last word (`_patiently`), then remove what this run and the job's earlier ones left in
    storage but the output the job recorded: a checkpoint cut off by a time limit or a full disk, one whole but
    never recorded (a cancel came first), one a killed run wrote before its successor took over. The job's
    recorded result is never taken from it, by this run or by a late one. Given the `place` of a run that may
    not have started the job (`_fail_run`), this sending's folder stays where a run elsewhere holds the job."""

    def last_word(session: Session) -> tuple[T, jobs.Artifact | None, bool]:
        said = write(session)
        held = place is not None and jobs.held_elsewhere(session, job_id, dispatch, place)
        return said, _recorded_output(session, job_id), held

    said, recorded, held = _patiently(db, job_id, last_word, patience)
    storage.remove_outputs(job_id, through=dispatch - 1 if held else dispatch,
                           keep=recorded.path if recorded else None)
    return said


def _recorded_output(session: Session, job_id: str) -> jobs.Artifact | None:
    job = session.get(jobs.Job, job_id)
    return job.artifact(jobs.OUTPUT) if job is not None else None


def _still_runs(db: Database, job_id: str, dispatch: int) -> bool:
    """Whether the job is still this run's (`jobs.heartbeat`): a run the sweeper took the job from, ending it
    or sending it again, and whose killed-run files it then removed, fails on its own folder gone. True while
    the database cannot say: the failure is then written as ever, a write that changes nothing if it is not."""
    try:
        with db.session() as session:
            return jobs.heartbeat(session, job_id, dispatch)
    except OperationalError:
        return True


def _stop_requested(db: Database, job_id: str, dispatch: int) -> bool:
    """Whether to stop; not while the database cannot say (the next epoch asks again)."""
    try:
        with db.session() as session:
            return jobs.stop_requested(session, job_id, dispatch)
    except OperationalError:
        log.warning("job %s: could not ask whether to stop; going on", job_id, exc_info=True)
        return False


def _patiently(db: Database, job_id: str, write: Callable[[Session], T], patience: float) -> T:
    """`write` in a session of its own, tried again through a database outage of up to `patience` seconds: a
    job's start, whose message would otherwise go back to the queue and come straight back, and its last word,
    without which its row stays running and the sweeper would run the whole job again."""
    deadline, pause = time.monotonic() + patience, 1.0
    while True:
        try:
            with db.session() as session:
                return write(session)
        except OperationalError:
            if time.monotonic() + pause > deadline:
                raise  # the task's error
            log.warning("job %s: the database refused a write; trying again in %s s", job_id, pause)
            time.sleep(pause)
            pause = min(2 * pause, FINAL_WRITE_PAUSE)


def _bound_lock_waits(session: Session, seconds: float) -> None:
    """At the hard time limit the main process writes the failure before billiard kills the pool process, which
    may hold the job's row in a transaction it will never end (stopped, or stuck in a call that keeps the GIL
    between a write and its commit). PostgreSQL would keep the main process waiting for ever, and with it every
    message of the worker; the failure gives up after `seconds` instead (the sweeper takes the job). A run's
    own process needs no bound: the hard limit ends its waits. SQLite's busy timeout bounds the same wait."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{seconds:g}s'"))


def _failure(job_id: str, error: Exception, time_limit: int) -> str:
    """What the job's owner reads: the engine's own words for a bad input, the time limit, a fault of the
    service's storage, or, for a bug of ours, a generic message (the traceback goes to the worker's log, never
    to the user, and neither does a server path)."""
    if isinstance(error, InputError):
        log.info("job %s: failed on its input: %s", job_id, error)
        return str(error)
    if _timed_out(error):
        log.info("job %s: timed out", job_id, exc_info=error if error.__context__ or error.__cause__ else None)
        return f"the job ran past the service's time limit of {time_limit} s; use fewer epochs or images"
    if isinstance(error, MissingInput):
        log.error("job %s: its %s file is missing from storage", job_id, error.role)
        return (f"the job's {error.role} file is no longer in the service's storage (it was removed); submit "
                "the job again, and tell the service's operators if this happens again")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        log.error("job %s: the storage is full", job_id, exc_info=error)
        return ("the service ran out of disk space while running this job; submit it again later, and tell the "
                "service's operators if this persists")
    log.exception("job %s: internal error", job_id, exc_info=error)
    return jobs.INTERNAL_ERROR


def _timed_out(error: BaseException | None) -> bool:
    """Whether `error` is Celery's time limit or was raised while handling it: the soft limit's signal can land
    inside a database call (the progress recorder's, say), and the driver then fails on its half-sent query
    with an error of its own, chained to the time limit."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SoftTimeLimitExceeded | TimeLimitExceeded):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _record_success(db: Database, storage: Storage, job_id: str, dispatch: int, report: dict, out: Path) -> None:
    """Register the cleansed checkpoint with the report, unless a cancel arrived after the last epoch: a
    cancelled job always ends cancelled, and its output is removed."""
    output = jobs.FileRecord(jobs.OUTPUT, output_name(dispatch), out.stat().st_size, sha256_file(out))

    def record(session: Session) -> bool:
        if jobs.succeed(session, job_id, dispatch, report, output):
            return True
        recorded = _recorded_output(session, job_id)
        if recorded is not None and (recorded.path, recorded.sha256) == (output.path, output.sha256):
            return True  # an earlier try was committed and its answer lost: the job is this run's already
        jobs.finish_cancelled(session, job_id, dispatch)
        return False

    succeeded = _end(db, storage, job_id, dispatch, record)
    log.info("job %s: %s", job_id, "succeeded" if succeeded else "cancelled after its last epoch")
