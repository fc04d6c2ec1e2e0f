"""The Celery application, shared by the worker that consumes jobs and the API that sends them.

Start a worker with `celery -A worker.app worker`. Importing this module imports neither torch nor the task
code (`worker.tasks` is loaded by the worker only), so the API can send jobs through it.
"""

from __future__ import annotations

import logging
import os
import sys

from celery import Celery
from celery.signals import worker_init
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from core.cli import setup_refused
from core.database import Database
from core.settings import Settings, get_settings
from worker.dispatch import SANITIZE, Sweeper

__all__ = ["BROKER_TIMEOUT", "SANITIZE", "app", "make_celery"]

# Seconds any one exchange with the broker may take before it counts as down. Redis answers in milliseconds;
# without a bound, a Redis that accepts connections but never answers (stopped, on a stalled host) would hold
# each submit and readiness probe, and with them the API's threads, for ever.
BROKER_TIMEOUT = 2.0

# Set on import, before anything imports torch (`celery -A worker.app` imports this module first): every
# torch.load in the worker then reads weights only, whatever its call says, so no later code (ours or a
# library's) can unpickle an uploaded checkpoint in full and run the code a pickle can carry. The engine
# already asks for weights_only=True; this is the process-wide guard behind it. Forced, not defaulted: an
# inherited "0" must not turn it off. Harmless in the API, which imports this module but never torch.
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`. Delivery is at-least-once: a job is acknowledged only when its task
    returns. A worker that dies mid-job (out of memory, killed) has its job queued again by the sweeper
    (`worker.dispatch`), where its `attempts` count in the database stops it from looping forever."""
    app = Celery("nad", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job at a time per worker (a GPU trains one model well, not two), and no job held back in a
        # busy worker's buffer while another worker idles.
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        # A fresh child process per job: whatever one job leaves in GPU memory goes with its process.
        worker_max_tasks_per_child=1,
        task_soft_time_limit=settings.job_time_limit,
        task_time_limit=settings.job_time_limit + 60,
        # Results live in the job database, not in Celery's result backend.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Redis's redelivery clock and socket timeouts; other transports take no such options (SQLAlchemy's
        # refuses them).
        app.conf.broker_transport_options = {"visibility_timeout": settings.visibility_timeout,
                                             "socket_timeout": BROKER_TIMEOUT,
                                             "socket_connect_timeout": BROKER_TIMEOUT}
    app.steps["worker"].add(Sweeper)
    return app


def _settings() -> Settings:
    """The environment's settings. One the worker cannot use stops it in one line naming the variable, as `make
    up` and `python -m api` do, rather than a traceback naming pydantic's field."""
    try:
        return get_settings()
    except ValidationError as error:
        sys.exit(f"worker: {setup_refused(error)}")


app = make_celery(_settings())


@worker_init.connect
def _migrate(**_kwargs) -> None:
    """A worker brings the schema up to date before it takes a job, as the API does when it starts. One whose
    database cannot be used stops in one line, as `python -m api` does: Celery logs a signal handler's error
    and goes on, and the worker said it was ready to take jobs it could never record."""
    try:
        database = Database(get_settings().database_url)
        try:
            database.migrate()
        finally:
            database.dispose()
    except SQLAlchemyError as error:
        sys.exit(f"worker: {setup_refused(error)}")
    except Exception as error:  # a migration's own fault: the worker must not go on to say it is ready
        logging.getLogger(__name__).exception("worker: the database migration failed")
        sys.exit(f"worker: the database migration failed ({type(error).__name__}: {error}); see the log above")
