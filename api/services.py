"""What the API's routes work with, made once per app by `api.app.create_app` and kept in its state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from core.database import Database
from core.keys import KeyCache
from core.settings import Settings
from core.storage import Storage


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    storage: Storage
    queue: Celery
    keys: KeyCache


async def services(request: Request) -> Services:
    return request.app.state.services


Service = Annotated[Services, Depends(services)]


async def reading(service: Service) -> AsyncIterator[AsyncSession]:
    """One asyncio read session per request, shared by the key check and the route that only reads."""
    async with service.db.read() as session:
        yield session


Reading = Annotated[AsyncSession, Depends(reading)]
