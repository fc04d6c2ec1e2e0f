"""The FastAPI application. Serve it with `python -m api`, or `uvicorn --factory api.app:create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from api import health, jobs, problems
from api.services import Services
from core import __version__
from core.cli import settings_or_exit
from core.database import Database
from core.keys import KeyCache
from core.params import SanitizeParams
from core.settings import Settings
from core.storage import Storage
from worker.broker import make_celery

DESCRIPTION = """
Removes backdoors from image classifiers. The default method, `auto`, cleans copies of the model with **Neural
Attention Distillation** (`nad`, Li et al., ICLR 2021), Shared Adversarial Unlearning (`sau`) and Feature Shift
Tuning (`fst`) and keeps the first whose accuracy on held-out clean images stays within `auto_budget` points of
the suspect's, or the most accurate when none does (one that missed by no more than the measurement's noise is
first trained and measured again on other held-out images); `method` may name one defense alone (the
`SanitizeParams` schema lists them).

1. `POST /sanitize` a suspect checkpoint, a small set of clean labelled images and the job's parameters
   (multipart). The answer is `202 Accepted` with `Location: /jobs/{id}`.
2. Poll `GET /jobs/{id}` until `status` is `succeeded` (or `failed`, with an `error` that says why).
3. `GET /jobs/{id}/metrics` for clean accuracy (ACC) and attack success rate (ASR) before and after;
   `GET /jobs/{id}/model` for the cleansed checkpoint (safetensors).

```
curl -sS -H "Authorization: Bearer $NAD_API_KEY" \\
     -F model=@backdoored.pt -F clean_data=@clean.tar.gz -F test_data=@test.tar.gz \\
     -F 'params={"arch": "wrn-16-1", "num_classes": 10, "target_label": 5, "trigger": {"type": "badnets",
                 "position": [-3, -3], "pattern": [[0, 0, 255], [0, 255, 0], [255, 0, 255]]}}' \\
     http://127.0.0.1:8000/sanitize
```

Every job endpoint needs an API key, as `Authorization: Bearer <key>` or `X-API-Key: <key>`; an operator makes
one with `nad keys create --name NAME`. A job is visible only to the key that created it. Every error is an
RFC 9457 problem (`application/problem+json`) whose `detail` says what to do.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: this process's NAD_ environment, which stops it in one line where it
    cannot be used). Connects to nothing until it starts; on start it migrates the database and clears uploads
    a crashed process left behind."""
    settings = settings or settings_or_exit("api")
    services = Services(settings=settings, db=Database(settings.database_url),
                        storage=Storage(settings.storage_dir), queue=make_celery(settings),
                        keys=KeyCache(settings.key_cache_seconds))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(services.db.migrate)
        await run_in_threadpool(services.storage.sweep_incoming)
        yield
        await services.db.dispose_reader()
        services.db.dispose()

    app = FastAPI(title="NAD sanitization service", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.services = services
    problems.install(app)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.openapi = lambda: _openapi(app)
    return app


# A parameter's schema that any value meets, once its documentation is set aside: FastAPI lists a 422 for an
# operation with parameters whatever they are.
ANY_STRING = ({"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]})


def _can_be_invalid(operation: dict[str, Any]) -> bool:
    """Whether a request can fail validation: it has a body, a parameter that not every string meets, or a
    required one that it may leave out (a path's is always there)."""
    documentation = {"title", "description"}
    return "requestBody" in operation or any(
        {key: value for key, value in parameter["schema"].items() if key not in documentation} not in ANY_STRING
        or (parameter.get("required") and parameter["in"] != "path")
        for parameter in operation.get("parameters", []))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description, with the schemas that routes refer to by hand (the problem document, and
    SanitizeParams for the `params` field of the multipart upload) and FastAPI's own 422 shape replaced by
    the problem that is actually sent, or dropped where nothing can be invalid (a job id that is not one is a
    404)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        models = [(SanitizeParams, "validation"), (problems.Problem, "serialization")]
        _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
        schemas.update(definitions["$defs"])
        for path in schema["paths"].values():
            for operation in path.values():
                if not _can_be_invalid(operation):
                    operation["responses"].pop("422", None)
                elif "application/json" in operation["responses"].get("422", {}).get("content", {}):
                    operation["responses"]["422"] = problems.responses(422)[422]
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
