"""Job records: the tables, and every function that reads or changes a job's state.

The database is the source of truth for a job; the broker only carries its id to a worker. Each state change
is one conditional UPDATE (`... WHERE status IN (...)`), so the API and a worker changing the same job at the
same moment cannot both win: a cancel that arrives as the job finishes either cancels it or is refused.

Statuses: queued -> running -> succeeded | failed | cancelling -> cancelled; queued -> cancelled at once.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, joinedload, mapped_column, relationship, selectinload

from core.database import Base


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
# What a user reads when a job failed for a reason of ours, not theirs; the traceback is in the worker's log.
INTERNAL_ERROR = (
    "the worker hit an internal error while running this job; submitting it again may work, and if it "
    "fails again please report the job id to the service's operators"
)


class UTCDateTime(TypeDecorator):
    """Timestamps stored in UTC and always read back in UTC: SQLite forgets the zone, PostgreSQL answers in the
    session's (a server set to Asia/Kolkata gave +05:30 where SQLite gave Z)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        # SQLite keeps a time's digits and drops its zone, and compares the digits: only UTC ones compare right.
        return value.astimezone(UTC) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)


def clock(session: Session) -> datetime:
    """Now by the database's clock, for every time a job records or compares. The API, the workers and
    their sweepers may run on several hosts: a worker's heartbeat stamped by its host's clock and read by a
    sweeper's that runs a grace behind would have the live job run a second time. PostgreSQL's server gives
    them one clock (`clock_timestamp()`: the time of the call, not of the transaction's start, which may have
    waited for a row). A SQLite file lives on one host, whose clock every process that opens it shares."""
    if session.get_bind().dialect.name == "sqlite":
        return now()
    return session.scalar(select(func.clock_timestamp())).astimezone(UTC)


_last_id = (0, 0)
_id_lock = threading.Lock()


def new_job_id() -> str:
    """32 hex digits: 12 of milliseconds since the epoch, then 20 random. Ids sort by creation time, which is
    what listing newest-first and its cursor rely on; the random part keeps them unguessable. Within one
    process they strictly increase: an id made in the same millisecond as the one before adds a random step
    to that one's random part (ULID's monotonic rule, with random steps), so two jobs made in one millisecond
    still list in the order they were made."""
    global _last_id
    with _id_lock:
        millis, secret = time.time_ns() // 1_000_000, int.from_bytes(os.urandom(9))  # 72 bits: room for steps
        last_millis, last_secret = _last_id
        if millis <= last_millis:
            millis, secret = last_millis, last_secret + 1 + int.from_bytes(os.urandom(4))
        _last_id = (millis, secret)
    return f"{millis:012x}{secret:020x}"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_id", "owner", "id"),  # an owner's jobs, newest first
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(32))
    queue: Mapped[str] = mapped_column(
        String(255), doc="the broker queue the job was sent to: a worker's sweeper looks after its queue's jobs only"
    )
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dispatch: Mapped[int] = mapped_column(
        Integer, default=0, doc="which message may run the job: the sweeper's re-sends count it up, so that a "
                                "message it replaced is dropped if it turns up after all"
    )
    runner: Mapped[str | None] = mapped_column(
        String(32), doc="which run of the job's message started it (`runner_token`): a start tried again after its "
                        "commit's answer was lost finds the job its own, where a copy of the message finds it another's"
    )
    stage: Mapped[str | None] = mapped_column(String(32))
    epoch: Mapped[int | None] = mapped_column(Integer)
    epochs: Mapped[int | None] = mapped_column(Integer)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="last sign of life of the process running the job: the sweeper requeues a job whose "
                         "process has been silent too long (its whole worker died)"
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin",
        order_by="Artifact.id",
    )

    def artifact(self, role: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.role == role), None)


def task_id(job_id: str, dispatch: int) -> str:
    """The broker message id of a job's `dispatch`-th sending: the sweeper finds a job's message by it."""
    return f"{job_id}-{dispatch}"


class Artifact(Base):
    """A file of a job: an upload (role model, clean_data, ...) or the cleansed checkpoint (role output)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "role", name="uq_artifacts_job_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(255), doc="relative to the job's storage folder")
    filename: Mapped[str | None] = mapped_column(String(255), doc="the client's name: shown, never used")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))

    job: Mapped[Job] = relationship(back_populates="artifacts")


OUTPUT = "output"


@dataclass(frozen=True)
class FileRecord:
    """What is known of a stored file when it is registered as an artifact."""

    role: str
    path: str
    size: int
    sha256: str
    filename: str | None = None


def _artifact(record: FileRecord) -> Artifact:
    return Artifact(role=record.role, path=record.path, filename=record.filename, size=record.size,
                    sha256=record.sha256)


class DuplicateRequest(Exception):
    """Another request with the same Idempotency-Key created its job first."""


class InvalidTransition(Exception):
    """The job is not in a status that allows the change; `status` is the one it is in."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


# ---- the API's side -------------------------------------------------------------------------------------


def create_job(
    session: Session,
    job_id: str,
    owner: str,
    queue: str,
    params: dict[str, Any],
    inputs: list[FileRecord],
    idempotency_key: str | None = None,
) -> Job:
    """Record a queued job, bound for `queue`, and its uploaded files. Raises DuplicateRequest when
    `idempotency_key` was used by the same owner in the meantime (the caller then answers with that job)."""
    stamp = clock(session)
    job = Job(id=job_id, owner=owner, queue=queue, params=params, idempotency_key=idempotency_key,
              created_at=stamp, updated_at=stamp, artifacts=[_artifact(record) for record in inputs])
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        raise DuplicateRequest from None
    return job


# A job with its files in one query, built once: a status read is the API's most frequent request, and a
# statement made afresh each time (session.get with options) costs about a third more (docs/benchmarks.md).
OWNED_JOB = (select(Job).options(joinedload(Job.artifacts))
             .where(Job.id == bindparam("job_id"), Job.owner == bindparam("owner")))


def get_job(session: Session, job_id: str, owner: str) -> Job | None:
    """The owner's job, or None: another owner's job is as absent as one that never existed."""
    return session.execute(OWNED_JOB, {"job_id": job_id, "owner": owner}).unique().scalar_one_or_none()


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def count_unfinished(session: Session, owner: str) -> int:
    """How many of the owner's jobs are queued or running (cancelling included: it holds a worker until its
    epoch ends). One count query, so the API can refuse a submission past its cap before receiving the body."""
    unfinished = (Status.QUEUED, Status.RUNNING, Status.CANCELLING)
    return session.scalar(select(func.count(Job.id)).where(Job.owner == owner, Job.status.in_(unfinished)))


def list_jobs(
    session: Session, owner: str, limit: int, cursor: str | None = None, statuses: Sequence[Status] = ()
) -> tuple[list[Job], str | None]:
    """A page of the owner's jobs (in one of `statuses`, when some are given), newest first, and the cursor of
    the next page (None on the last). The cursor is the last id shown: ids sort by creation time, so a page is
    stable while jobs are added."""
    query = (select(Job).options(selectinload(Job.artifacts)).where(Job.owner == owner).order_by(Job.id.desc())
             .limit(limit + 1))
    if cursor is not None:
        query = query.where(Job.id < cursor)
    if statuses:
        query = query.where(Job.status.in_(statuses))
    found = list(session.scalars(query))
    page = found[:limit]
    return page, page[-1].id if len(found) > limit else None


def _transition(session: Session, job_id: str, allowed: tuple[Status, ...], dispatch: int | None = None,
                stamped: tuple[str, ...] = (), place: str | None = None, **values: Any) -> bool:
    """Set `values`, and `updated_at` and the columns named in `stamped` to now (one read of the database's
    clock), if the job is in one of the `allowed` statuses (and, given `dispatch`, still run by that sending:
    a worker whose job was taken from it changes nothing; given `place`, by a run that lives there, as
    `runner_place` says); False if not (or the job is gone)."""
    query = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if dispatch is not None:
        query = query.where(Job.dispatch == dispatch)
    if place is not None:
        query = query.where(_lives_at(place))
    now = clock(session)
    query = query.values(updated_at=now, **dict.fromkeys(stamped, now), **values)
    return session.execute(query.execution_options(synchronize_session=False)).rowcount == 1


def request_cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is asked to stop (the worker checks between epochs).
    Asking again is harmless. Raises InvalidTransition for a job that already succeeded or failed."""
    cancelled = _transition(session, job.id, (Status.QUEUED,), status=Status.CANCELLED,
                            stamped=("cancel_requested_at", "finished_at"))
    if not cancelled:
        _transition(session, job.id, (Status.RUNNING,), status=Status.CANCELLING, stamped=("cancel_requested_at",))
    session.refresh(job)
    if job.status not in (Status.CANCELLING, Status.CANCELLED):
        raise InvalidTransition(job.status)


def delete_job(session: Session, job: Job) -> None:
    """Forget a finished job (its files are the caller's to remove). Raises InvalidTransition otherwise."""
    if not forget_finished(session, job.id):
        session.refresh(job)
        raise InvalidTransition(job.status)


def forget_finished(session: Session, job_id: str) -> bool:
    """Forget the job if it has finished (its files are the caller's to remove): False when it has not, or is
    gone already."""
    return session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(FINISHED))).rowcount == 1


def finished_before(session: Session, cutoff: datetime) -> list[tuple[str, str, datetime]]:
    """(id, status, finished_at) of every job, whoever's, that succeeded, failed or was cancelled before
    `cutoff`, oldest first: what `nad expire` deletes."""
    query = (select(Job.id, Job.status, Job.finished_at).where(Job.status.in_(FINISHED), Job.finished_at < cutoff)
             .order_by(Job.finished_at, Job.id))
    return [tuple(row) for row in session.execute(query)]


def waiting(session: Session, queue: str, since: datetime) -> list[tuple[str, int]]:
    """(id, dispatch) of every job of `queue` queued, and not changed, since before `since`: those whose
    message the sweeper looks for in the broker."""
    query = select(Job.id, Job.dispatch).where(Job.queue == queue, Job.status == Status.QUEUED,
                                               Job.updated_at < since)
    return [(job_id, dispatch) for job_id, dispatch in session.execute(query.order_by(Job.id))]


def redispatch(session: Session, job_id: str, dispatch: int) -> bool:
    """Claim the re-sending of a queued job whose message `dispatch` is lost; False when the job has started,
    finished or been re-sent meanwhile (by another sweeper), so exactly one new message is sent."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == Status.QUEUED, Job.dispatch == dispatch)
        .values(dispatch=dispatch + 1, updated_at=clock(session))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


# Job ids per statement where a list of them is looked up: SQLite before 3.32 takes at most 999 parameters.
IDS_PER_QUERY = 500


def _in_chunks(job_ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(job_ids), IDS_PER_QUERY):
        yield job_ids[start:start + IDS_PER_QUERY]


def unrecorded(session: Session, job_ids: Sequence[str]) -> list[str]:
    """Those of `job_ids` that no job of this database has: the folders of jobs deleted or withdrawn by a
    process killed before it removed their files (`nad tidy`)."""
    found: set[str] = set()
    for chunk in _in_chunks(job_ids):
        found.update(session.scalars(select(Job.id).where(Job.id.in_(chunk))))
    return [job_id for job_id in job_ids if job_id not in found]


def finished_outputs(session: Session, job_ids: Sequence[str]) -> dict[str, str | None]:
    """The finished jobs of `job_ids`, each with the path of the output it recorded (None: none). No run of
    theirs can record another, so their other output folders are leftovers (`nad tidy`): the checkpoint a
    worker's process was writing when the hard time limit killed it, just after its failure removed the
    folder, say. One a run taken from the job still writes is removed by that run when it ends, if not before."""
    found: dict[str, str | None] = {}
    for chunk in _in_chunks(job_ids):
        output = (Artifact.job_id == Job.id) & (Artifact.role == OUTPUT)
        found.update(session.execute(select(Job.id, Artifact.path).outerjoin(Artifact, output)
                                     .where(Job.id.in_(chunk), Job.status.in_(FINISHED))).all())
    return found


def withdraw(session: Session, job_id: str) -> None:
    """Remove a job whose id never reached the broker, as if it had not been submitted."""
    session.execute(delete(Job).where(Job.id == job_id))


# ---- the worker's side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """What a worker needs to run a job: its parameters and its input files by role."""

    job_id: str
    dispatch: int
    params: dict[str, Any]
    inputs: dict[str, str]


# Read once, at import: a worker's pool processes, forked from its main process, agree with it on the name
# even should the host be renamed while they run.
HOST = socket.gethostname()


def runner_place(node: str | None, pid: int) -> str:
    """Where a run lives, as the first 20 characters of its token: its worker's node name and host name (hashed)
    and its pool process. The worker's main process, which writes the failure of a run it killed at the hard
    time limit, knows these of the run and no more. The host name tells apart the containers of workers given
    one node name by hand, whose pool processes' ids, small numbers in each container, may well be equal."""
    where = f"{node or ''}\0{HOST}"
    return hashlib.blake2b(where.encode(), digest_size=6).hexdigest() + f"{pid:08x}"


def runner_token(node: str | None, pid: int) -> str:
    """A token for one run of a job's message, drawn by the run (`start_attempt`): where it lives, and 48 random
    bits that tell it from any other run there (a pool process's id comes round again)."""
    return runner_place(node, pid) + uuid.uuid4().hex[:12]


def start_attempt(session: Session, job_id: str, dispatch: int, runner: str) -> Assignment | None:
    """Count one more start of the job and mark it running by `runner`, the token its run drew; None when there
    is nothing to run.

    Only a queued job starts. A message for a job that has started is a copy: a worker gives its message back
    when its pool process dies, and a broker hands a worker's unacknowledged message to another when their
    connection drops. The run it copies may still live, and one look cannot tell: after a database outage
    every heartbeat is old, live ones too. Two runs at once would overwrite each other's progress and
    checkpoint. A run that is in fact dead is the sweeper's (`recover`): once two of its rounds found the job
    silent, it queues it again under a new dispatch (`worker.dispatch`), and that message starts it.

    A job cancelled, deleted or finished in the meantime is not run, nor one whose message the sweeper has
    replaced (`dispatch` is not the job's): the replacement runs it.

    A start found already made by `runner` itself is its own: the database committed it and the connection
    dropped before the answer came, and the run tried again. Taken for a copy's, the job sat running with no
    run until the sweeper took it back, an attempt spent.
    """
    job = session.get(Job, job_id, with_for_update=True)  # two copies at once: the second finds it running
    if job is None or job.dispatch != dispatch:
        return None
    if job.status in (Status.RUNNING, Status.CANCELLING) and job.runner == runner:
        return _assignment(job)
    if job.status != Status.QUEUED:
        return None
    job.attempts += 1
    job.status, job.runner = Status.RUNNING, runner
    job.started_at = job.updated_at = job.heartbeat_at = clock(session)  # read once the row is ours
    job.stage, job.epoch, job.epochs, job.progress = None, None, None, 0.0
    return _assignment(job)


def _assignment(job: Job) -> Assignment:
    return Assignment(job.id, job.dispatch, job.params, {a.role: a.path for a in job.artifacts})


def record_progress(session: Session, job_id: str, dispatch: int, stage: str, progress: float, epoch: int | None,
                    epochs: int | None) -> None:
    """Where a running job is; ignored once the job has left running/cancelling."""
    _transition(session, job_id, (Status.RUNNING, Status.CANCELLING), dispatch, stage=stage, progress=progress,
                epoch=epoch, epochs=epochs, stamped=("heartbeat_at",))


def heartbeat(session: Session, job_id: str, dispatch: int) -> bool:
    """The job's process is alive; False once the job is no longer its to run (finished, or requeued by the
    sweeper). Not a change of the job, so `updated_at` stays."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_((Status.RUNNING, Status.CANCELLING)), Job.dispatch == dispatch)
        .values(heartbeat_at=clock(session))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def stop_requested(session: Session, job_id: str, dispatch: int) -> bool:
    """Whether the job should stop: it is being cancelled, no longer exists, or was given to another worker.
    One primary-key read."""
    row = session.execute(select(Job.status, Job.dispatch).where(Job.id == job_id)).one_or_none()
    return row is None or tuple(row) != (Status.RUNNING, dispatch)


def succeed(session: Session, job_id: str, dispatch: int, report: dict[str, Any], output: FileRecord) -> bool:
    """Store the report and register the cleansed checkpoint; False when the job was cancelled (or taken
    from this worker) meanwhile: the caller then discards the output and calls finish_cancelled."""
    done = _transition(session, job_id, (Status.RUNNING,), dispatch, status=Status.SUCCEEDED, report=report,
                       progress=1.0, stage="done", stamped=("finished_at",))
    if done:
        artifact = _artifact(output)
        artifact.job_id = job_id
        session.add(artifact)
    return done


def fail(session: Session, job_id: str, dispatch: int, error: str, place: str | None = None) -> None:
    """Mark the job failed with a message its owner can act on. Given `place` (`runner_place`), only if the
    run that started it lives there: a failure written for a run that may never have started the job (a
    copy of the message, killed as it waited for its start) must not end another run's."""
    _transition(session, job_id, (Status.RUNNING, Status.CANCELLING), dispatch, place=place, status=Status.FAILED,
                error=error, stamped=("finished_at",))


def held_elsewhere(session: Session, job_id: str, dispatch: int, place: str) -> bool:
    """Whether a run that does not live at `place` holds the job at `dispatch`: the files of that sending are
    then that run's. A run started by a worker older than the token (no `runner`) lives elsewhere too."""
    return session.execute(
        select(Job.id).where(Job.id == job_id, Job.dispatch == dispatch,
                             Job.status.in_((Status.RUNNING, Status.CANCELLING)),
                             or_(Job.runner.is_(None), ~_lives_at(place)))
    ).first() is not None


def _lives_at(place: str) -> ColumnElement[bool]:
    """The job's run lives at `place` (`runner_place`): its token begins with it."""
    return Job.runner.startswith(place, autoescape=True)


def finish_cancelled(session: Session, job_id: str, dispatch: int) -> None:
    _transition(session, job_id, (Status.RUNNING, Status.CANCELLING), dispatch, status=Status.CANCELLED,
                stamped=("finished_at",))


# ---- the sweeper's side ---------------------------------------------------------------------------------


def silent(session: Session, queue: str, since: datetime) -> list[tuple[str, int]]:
    """(id, dispatch) of every running or cancelling job of `queue` whose process has given no sign of life
    since before `since`: its worker died with it (a machine lost, a `kill -9` of the whole worker)."""
    query = select(Job.id, Job.dispatch).where(
        Job.queue == queue, Job.status.in_((Status.RUNNING, Status.CANCELLING)), Job.heartbeat_at < since
    )
    return [(job_id, dispatch) for job_id, dispatch in session.execute(query.order_by(Job.id))]


def recover(session: Session, job_id: str, dispatch: int, since: datetime, max_attempts: int) -> Status | None:
    """Take a silent job from its dead worker, and say what it became (None: nothing, the job spoke up or
    another sweeper took it meanwhile; the conditions are checked again in each UPDATE). A cancelling job ends
    cancelled. A running one goes back to queued under a new dispatch, for which a message must be sent,
    unless it was started `max_attempts` times already: a job that keeps killing its workers fails instead of
    taking down one more. A job it ends, cancelled or failed, leaves its killed runs' files to the caller."""
    attempts = session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one_or_none()
    if attempts is None:
        return None
    silent_since = (Job.id == job_id, Job.dispatch == dispatch, Job.heartbeat_at < since)
    stamp = clock(session)
    starts = "its one start" if attempts == 1 else f"each of its {attempts} starts"
    ends = (
        (Status.CANCELLED, update(Job).where(*silent_since, Job.status == Status.CANCELLING)
         .values(status=Status.CANCELLED, finished_at=stamp, updated_at=stamp)),
        (Status.FAILED, update(Job).where(*silent_since, Job.status == Status.RUNNING, Job.attempts >= max_attempts)
         .values(status=Status.FAILED, finished_at=stamp, updated_at=stamp,
                 error=f"the job's worker stopped before the job finished, at {starts} (out of memory, the "
                 "machine restarted, or the time limit reached while the database was out, which kept that "
                 "failure from being written); try smaller batch_size, fewer images or fewer epochs, or ask the "
                 "operators")),
        (Status.QUEUED, update(Job).where(*silent_since, Job.status == Status.RUNNING)
         .values(status=Status.QUEUED, dispatch=dispatch + 1, stage=None, epoch=None, epochs=None, progress=0.0,
                 updated_at=stamp)),
    )
    for status, query in ends:
        if session.execute(query.execution_options(synchronize_session=False)).rowcount == 1:
            return status
    return None
