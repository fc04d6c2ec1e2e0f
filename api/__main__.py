"""`python -m api`: migrate the database, then serve the API on NAD_API_HOST:NAD_API_PORT with NAD_API_WORKERS
processes."""

import uvicorn

from core.database import Database
from core.settings import get_settings

if __name__ == "__main__":
    settings = get_settings()
    # Once here, so that several worker processes starting together find the schema in place.
    database = Database(settings.database_url)
    database.migrate()
    database.dispose()
    uvicorn.run("api.app:create_app", factory=True, host=settings.api_host, port=settings.api_port,
                workers=settings.api_workers)
