"""Sending jobs to the workers, and finding the ones whose message the broker lost or whose worker died.

A job's message carries its id and which sending it is (`dispatch`), nothing else. The database says which
jobs are queued; Redis only carries messages, and a Redis restarted without its data (or flushed) forgets
them. A sweeper in every worker compares the two now and then: a job queued for a while whose message is in
neither the queue nor the workers' unacknowledged set is sent again, with `dispatch` counted up first by a
conditional UPDATE. With kombu's SQLAlchemy transport (`make up`'s fallback) it reads the messages waiting in
its table: one taken by a worker killed before it started the job is lost there. However many sweepers race,
one new message is sent, and the old one, should it turn up after all, is dropped by the worker
(`core.jobs.start_attempt`): a job never runs twice at once.

A running job's process writes a heartbeat to its row (`worker.tasks`). When a whole worker dies (the
machine is lost, or a `kill -9` takes the worker and its pool at once), nothing gives its message back before
Redis's visibility timeout of hours; the sweeper instead finds the job silent for a sweep interval, at two
rounds in a row, and queues it again under a new dispatch, so the old message, when Redis does give it back,
is dropped. A worker's pool process that dies alone is replaced by its worker, which gives the message back at
once; that copy finds the job started and runs nothing (`core.jobs.start_attempt`), and the sweeper
queues the job again the same way. A job the sweeper ends instead (cancelled, or out of attempts) has no run
left to tidy up after its killed ones, so the sweeper removes what they wrote.

The sweeper sends a job's new message inside the transaction of the UPDATE that claims it (`dispatch` counted
up), before the commit. A send that fails rolls the claim back: the job is as it was, and the next round tries
again, whatever the broker (one whose queue the sweeper cannot read, RabbitMQ say, included). A worker given
the message before the commit waits for it on the job's row (`start_attempt` locks it; on SQLite, the write
lock), so it never finds the old dispatch and drops the message. A commit that fails after the send leaves a
message for a dispatch the job never took: dropped, and the next round sends again. On SQLite every writer
waits for the send meanwhile: milliseconds, 4 s while Redis or RabbitMQ stalls, and 10 s (SQLite's busy
timeout, so a write begun then is refused) while another process holds the fallback broker's own file. The
broker may not live in the job database's file (`core.settings`): its send would wait on the claim's lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, bootsteps
from sqlalchemy import select

from core import jobs
from core.database import Database
from core.settings import get_settings
from core.storage import Storage

log = logging.getLogger(__name__)

SANITIZE = "nad.sanitize"
# Publishing a job id takes milliseconds; a broker that does not answer within about a second is down, and
# the client is better told so than kept waiting.
SEND_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def send_job(app: Celery, job_id: str, dispatch: int) -> None:
    """Publish a job for the workers, its message id naming the job and the sending (`core.jobs.task_id`)."""
    app.send_task(SANITIZE, args=[job_id, dispatch], task_id=jobs.task_id(job_id, dispatch),
                  retry_policy=SEND_RETRY)


def broker_task_ids(app: Celery, queue: str) -> set[str] | None:
    """Ids of the messages the broker holds for `queue`; None where its queue cannot be read (a transport other
    than Redis and kombu's SQLAlchemy, which `make up` falls back to)."""
    read = _message_reader(app)
    if read is None:
        return None
    with app.connection_for_write() as connection:
        messages = read(connection.default_channel, queue)
    return {message.get("headers", {}).get("id") for message in messages}


def broker_transport(app: Celery) -> str:
    """kombu's name for the transport of the app's broker, read without connecting: "redis" for every URL that
    reaches Redis (redis://, rediss://, redis+socket://), "sql" for kombu's SQLAlchemy transport."""
    with app.connection_for_write() as connection:
        return connection.transport.driver_type


def _message_reader(app: Celery) -> Callable[[Any, str], list[dict]] | None:
    """The function that reads the app's broker's messages for a queue, by its transport; None for a transport
    whose messages it cannot read."""
    return {"redis": _redis_messages, "sql": _sql_messages}.get(broker_transport(app))


def _redis_messages(channel: Any, queue: str) -> list[dict]:
    """Redis's messages for `queue`, waiting or taken by a worker and not yet acknowledged, read in one
    transaction so that no message is seen moving from one to the other."""
    keys = [queue] + [f"{queue}{channel.sep}{step}" for step in channel.priority_steps if step]
    with channel.client.pipeline(transaction=True) as pipe:
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(channel.unacked_key)
        *waiting, unacked = pipe.execute()
    return [json.loads(raw) for batch in waiting for raw in batch] + [json.loads(raw)[0] for raw in unacked]


def _sql_messages(channel: Any, queue: str) -> list[dict]:
    """The messages waiting for `queue` in kombu's SQLAlchemy transport. One a worker has taken is kept in that
    worker's memory only, and is lost if the worker is killed. So a job queued for a sweep interval whose
    message was taken and that has not started is sent again: its worker was killed, or (rarely) its start
    waits out a database outage; should the taken message start after all, it finds its dispatch replaced and
    runs nothing, and the job runs from the new message, at the back of the queue."""
    message, named = channel.message_cls, channel.queue_cls
    session = channel.session
    try:
        payloads = session.scalars(select(message.payload).join(named, message.queue_id == named.id)
                                   .where(named.name == queue, message.visible.is_not(False)))
        return [json.loads(payload) for payload in payloads]
    finally:
        session.rollback()


@dataclass(frozen=True)
class Round:
    """What one sweep did: the jobs it `sent` again, and the running jobs it found `silent` (job id, dispatch),
    which the next round requeues if they are silent still."""

    sent: list[str]
    silent: frozenset[tuple[str, int]]


def sweep(app: Celery, db: Database, storage: Storage, queue: str, grace: float, max_attempts: int,
          silent_before: frozenset[tuple[str, int]] = frozenset()) -> Round:
    """One round over the jobs of `queue` (several queues may share a database; each has its workers): the
    jobs of dead workers (each queued again, or ended past `max_attempts`), then, where the broker's queue can
    be read (`broker_task_ids`), the jobs whose message is lost, each sent again.

    A running job is requeued only when the previous round (`silent_before`, one interval ago, with the
    database answering both times) found it silent too. After an outage of the database every heartbeat is
    old, live jobs' too: their workers write one within a quarter of the interval once it is back, and a round
    that came first would have run them twice at once."""
    with db.session() as session:
        since = jobs.clock(session) - timedelta(seconds=grace)
    requeued, silent = _requeue_silent(app, db, storage, queue, since, max_attempts, silent_before)
    resent = _resend_lost(app, db, queue, since)
    return Round(requeued + resent, silent)


def _requeue_silent(app: Celery, db: Database, storage: Storage, queue: str, since: datetime, max_attempts: int,
                    silent_before: frozenset[tuple[str, int]]) -> tuple[list[str], frozenset[tuple[str, int]]]:
    """Jobs whose process has been silent since before `since`, and was at the round before, go back to the
    queue under a new dispatch, or end (`core.jobs.recover`) with their killed runs' outputs removed; every
    job silent now is returned, for the next round."""
    with db.session() as session:
        silent = frozenset(jobs.silent(session, queue, since))
    requeued = []
    for job_id, dispatch in sorted(silent & silent_before):
        with db.session() as session:
            became = jobs.recover(session, job_id, dispatch, since, max_attempts)
            if became == jobs.Status.QUEUED:
                send_job(app, job_id, dispatch + 1)  # before the claim commits (the module's docstring)
        if became == jobs.Status.QUEUED:
            log.warning("job %s: its worker stopped giving signs of life; queued it again", job_id)
            requeued.append(job_id)
        elif became is not None:
            storage.remove_outputs(job_id, through=dispatch, keep=None)  # no output is recorded: it did not succeed
            log.warning("job %s: its worker stopped giving signs of life; the job is %s", job_id, became)
    return requeued, silent


def _resend_lost(app: Celery, db: Database, queue: str, since: datetime) -> list[str]:
    """Jobs queued since before `since` (which covers the moment between a job's recording and its sending)
    whose message the broker no longer holds are sent again."""
    with db.session() as session:
        candidates = jobs.waiting(session, queue, since)
    if not candidates:
        return []
    held = broker_task_ids(app, queue)
    if held is None:
        return []
    resent = []
    for job_id, dispatch in candidates:
        if jobs.task_id(job_id, dispatch) in held:
            continue
        with db.session() as session:
            claimed = jobs.redispatch(session, job_id, dispatch)
            if claimed:
                send_job(app, job_id, dispatch + 1)  # before the claim commits (the module's docstring)
        if claimed:
            log.warning("job %s: the broker had lost its message; sent it again", job_id)
            resent.append(job_id)
    return resent


class Sweeper(bootsteps.StartStopStep):
    """Runs `sweep` every NAD_SWEEP_INTERVAL seconds in the worker's main process, on its event loop's timer
    (kombu's SQLAlchemy transport has no event loop: there, on Celery's timer thread). Each sweep opens and
    closes its own database connection: a pool kept open here would be inherited by every job's process. It
    keeps the silent jobs of its last round for the next, and forgets them when a round fails: the database may
    have been out since."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref = None
        self.silent: frozenset[tuple[str, int]] = frozenset()

    def start(self, worker) -> None:
        settings = get_settings()
        if _message_reader(worker.app) is None:
            log.info("sweeper: it takes back the jobs of dead workers; lost messages it finds in Redis and in "
                     "kombu's SQLAlchemy transport only, and the broker is %s", settings.broker_url.split(":")[0])
        self.timer_ref = worker.timer.call_repeatedly(settings.sweep_interval, self.run, (worker.app,),
                                                      priority=10)

    def stop(self, worker) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def run(self, app: Celery) -> None:
        settings = get_settings()
        db = Database(settings.database_url)
        try:
            self.silent = sweep(app, db, Storage(settings.storage_dir), settings.queue, settings.sweep_interval,
                                settings.max_attempts, self.silent).silent
        except Exception:
            self.silent = frozenset()
            log.exception("sweeper: this round failed; the next one tries again")
        finally:
            db.dispose()
