"""The sanitization task. It receives a job id only: parameters and files come from the database and the
storage folder, so a message carries nothing a client wrote, and a redelivered message runs the same job."""

from __future__ import annotations

import logging
import time
from functools import cache
from pathlib import Path

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from core import jobs
from core.database import Database
from core.engine.checkpoints import sha256_file
from core.engine.errors import Cancelled, InputError
from core.engine.events import Event
from core.engine.sanitize import JobFiles, sanitize
from core.params import SanitizeParams
from core.settings import get_settings
from core.storage import OUTPUT_PATH, Storage
from worker.app import SANITIZE, app

log = logging.getLogger(__name__)

# Seconds between two progress writes within one stage; epoch ends and stage changes are always written.
PROGRESS_INTERVAL = 1.0


@cache
def database() -> Database:
    """This process's connection pool, made on first use: in the child process that runs jobs, never
    inherited through a fork."""
    return Database(get_settings().database_url)


class ProgressRecorder:
    """Writes the engine's events to the job's row, sparingly: a step event every few milliseconds would
    otherwise mean as many database writes."""

    def __init__(self, db: Database, job_id: str) -> None:
        self.db, self.job_id = db, job_id
        self.stage: str | None = None
        self.written_at = float("-inf")

    def __call__(self, event: Event) -> None:
        epoch_end = event.epoch is not None and event.step is None
        now = time.monotonic()
        if event.stage == self.stage and not epoch_end and now - self.written_at < PROGRESS_INTERVAL:
            return
        self.stage, self.written_at = event.stage, now
        with self.db.session() as session:
            jobs.record_progress(session, self.job_id, event.stage, event.progress, event.epoch, event.epochs)


def job_files(storage: Storage, assignment: jobs.Assignment) -> JobFiles:
    """The engine's view of a job's files, from the paths the API recorded."""

    def path(role: str) -> Path | None:
        relative = assignment.inputs.get(role)
        return storage.path(assignment.job_id, relative) if relative else None

    return JobFiles(checkpoint=path("model"), clean_data=path("clean_data"), test_data=path("test_data"),
                    poison_data=path("poison_data"), teacher=path("teacher"),
                    out=storage.output_path(assignment.job_id))


class SanitizeTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: object) -> None:
        """What escaped the task: the hard time limit (the pool process was killed mid-job; Celery calls
        this in the main process) or a database that failed as the job ended. The job is failed rather than
        left running forever. A connection of its own: the main process must not open the cached pool its
        future children would inherit."""
        (job_id,) = args
        db = Database(get_settings().database_url)
        try:
            with db.session() as session:
                jobs.fail(session, job_id, _failure(job_id, exc, get_settings().job_time_limit))
        finally:
            db.dispose()


@app.task(name=SANITIZE, base=SanitizeTask)
def sanitize_job(job_id: str) -> None:
    """Run one job to its end: succeeded, failed or cancelled, as recorded in the database."""
    settings = get_settings()
    db = database()
    with db.session() as session:
        assignment = jobs.start_attempt(session, job_id, settings.max_attempts)
    if assignment is None:
        log.info("job %s: nothing to run (cancelled, deleted, finished or out of attempts)", job_id)
        return
    log.info("job %s: started", job_id)
    files = job_files(Storage(settings.storage_dir), assignment)
    try:
        params = SanitizeParams.model_validate(assignment.params)
        report = sanitize(files, params, ProgressRecorder(db, job_id), lambda: _stop_requested(db, job_id))
        _record_success(db, job_id, report, files.out)
    except Cancelled:
        with db.session() as session:
            jobs.finish_cancelled(session, job_id)
        log.info("job %s: cancelled", job_id)
    except Exception as error:
        message = _failure(job_id, error, settings.job_time_limit)
        with db.session() as session:
            jobs.fail(session, job_id, message)


def _stop_requested(db: Database, job_id: str) -> bool:
    with db.session() as session:
        return jobs.stop_requested(session, job_id)


def _failure(job_id: str, error: Exception, time_limit: int) -> str:
    """What the job's owner reads: the engine's own words for a bad input, the time limit, or, for a bug of
    ours, a generic message (the traceback goes to the worker's log, never to the user)."""
    if isinstance(error, InputError):
        log.info("job %s: failed on its input: %s", job_id, error)
        return str(error)
    if isinstance(error, SoftTimeLimitExceeded | TimeLimitExceeded):
        log.info("job %s: timed out", job_id)
        return f"the job ran past the service's time limit of {time_limit} s; use fewer epochs or images"
    log.exception("job %s: internal error", job_id, exc_info=error)
    return jobs.INTERNAL_ERROR


def _record_success(db: Database, job_id: str, report: dict, out: Path) -> None:
    """Register the cleansed checkpoint with the report, unless a cancel arrived after the last epoch: a
    cancelled job always ends cancelled, and its output is removed."""
    output = jobs.FileRecord(jobs.OUTPUT, OUTPUT_PATH, out.stat().st_size, sha256_file(out))
    with db.session() as session:
        succeeded = jobs.succeed(session, job_id, report, output)
        if not succeeded:
            jobs.finish_cancelled(session, job_id)
    if not succeeded:
        out.unlink(missing_ok=True)
    log.info("job %s: %s", job_id, "succeeded" if succeeded else "cancelled after its last epoch")
