"""`python -m api`: migrate the database, then serve the API on NAD_API_HOST:NAD_API_PORT with NAD_API_WORKERS
processes."""

import sys

import uvicorn
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from core.cli import setup_refused
from core.database import migrate_database
from core.settings import Settings, get_settings


def prepare() -> Settings:
    """The settings, and the database migrated once here, so that several worker processes starting together
    find the schema in place. A setting or database that cannot be used stops it in one line (as `make up`)."""
    try:
        settings = get_settings()
        migrate_database(settings.database_url)
    except (ValidationError, SQLAlchemyError) as error:
        sys.exit(f"python -m api: {setup_refused(error)}")
    return settings


if __name__ == "__main__":
    settings = prepare()
    uvicorn.run("api.app:create_app", factory=True, host=settings.api_host, port=settings.api_port,
                workers=settings.api_workers)
