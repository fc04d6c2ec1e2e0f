"""`python -m api`: serve the API on NAD_API_HOST:NAD_API_PORT."""

import uvicorn

from core.settings import get_settings

if __name__ == "__main__":
    settings = get_settings()
    uvicorn.run("api.app:create_app", factory=True, host=settings.api_host, port=settings.api_port)
