"""The Celery app's configuration: how jobs travel from the API to the workers. The API sends through an app
made here, the worker consumes through one (`worker.app`); importing this module reads no settings and imports
neither torch nor the task code."""

from __future__ import annotations

from celery import Celery

from core.settings import Settings
from worker.dispatch import Sweeper, broker_transport

# Seconds any one exchange with the broker may take before it counts as down. Redis answers in milliseconds;
# without a bound, a Redis that accepts connections but never answers (stopped, on a stalled host) would hold
# each submit and readiness probe, and with them the API's threads, for ever.
BROKER_TIMEOUT = 2.0


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
    if broker_transport(app) == "redis":
        # Redis's redelivery clock and socket timeouts; other transports take no such options (SQLAlchemy's
        # refuses them).
        app.conf.broker_transport_options = {"visibility_timeout": settings.visibility_timeout,
                                             "socket_timeout": BROKER_TIMEOUT,
                                             "socket_connect_timeout": BROKER_TIMEOUT}
    app.steps["worker"].add(Sweeper)
    return app
