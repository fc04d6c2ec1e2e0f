"""The worker's Celery application: start a worker with `celery -A worker.app worker`.

Importing this module reads the environment's settings and stops the process in one line where they cannot be
used, so only the worker imports it; the API builds its own app to send jobs with (`worker.broker`).
"""

from __future__ import annotations

import logging
import os
import sys

from celery.signals import worker_init
from sqlalchemy.exc import SQLAlchemyError

from core.cli import settings_or_exit, setup_refused
from core.database import migrate_database
from core.settings import get_settings
from worker.broker import make_celery

# Set on import, before anything imports torch (`celery -A worker.app` imports this module first): every
# torch.load in the worker then reads weights only, whatever its call says, so no later code (ours or a
# library's) can unpickle an uploaded checkpoint in full and run the code a pickle can carry. The engine
# already asks for weights_only=True; this is the process-wide guard behind it. Forced, not defaulted: an
# inherited "0" must not turn it off.
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


app = make_celery(settings_or_exit("worker"))


@worker_init.connect
def _migrate(**_kwargs) -> None:
    """A worker brings the schema up to date before it takes a job, as the API does when it starts. One whose
    database cannot be used stops in one line, as `python -m api` does: Celery logs a signal handler's error
    and goes on, and the worker said it was ready to take jobs it could never record."""
    try:
        migrate_database(get_settings().database_url)
    except SQLAlchemyError as error:
        sys.exit(f"worker: {setup_refused(error)}")
    except Exception as error:  # a migration's own fault: the worker must not go on to say it is ready
        logging.getLogger(__name__).exception("worker: the database migration failed")
        sys.exit(f"worker: the database migration failed ({type(error).__name__}: {error}); see the log above")
