"""Liveness and readiness, for a load balancer or an orchestrator."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter

from api.problems import ProblemError, responses
from api.services import Service, Services
from worker.broker import BROKER_TIMEOUT

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:  # async: it answers even when every worker thread waits on something
    return {"status": "ok"}


@router.get("/readyz", summary="The database, the broker and the storage folder are usable",
            responses=responses(503))
def readyz(service: Service) -> dict[str, str]:
    failures = [name for name, check in _CHECKS.items() if not _passes(check, service, name)]
    if failures:
        raise ProblemError(503, f"not ready: {', '.join(failures)} unreachable or unusable; check that "
                                "NAD_DATABASE_URL, NAD_BROKER_URL and NAD_STORAGE_DIR are right and up")
    return {"status": "ready"}


def _database(service: Services) -> None:
    service.db.ping()


def _broker(service: Services) -> None:
    with service.queue.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)


def _storage(service: Services) -> None:
    service.storage.check_writable()


_CHECKS = {"database": _database, "broker": _broker, "storage": _storage}


def _passes(check: Callable[[Services], None], service: Services, name: str) -> bool:
    try:
        check(service)
    except Exception as error:
        log.warning("readiness: %s check failed: %s", name, error)
        return False
    return True
