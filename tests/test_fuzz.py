"""Property-based fuzzing of the whole HTTP API from its own OpenAPI description, with schemathesis.

Every operation of `/openapi.json` gets generated requests (the schema's examples, schemathesis' coverage
cases, then random valid and invalid ones), sent in-process to the real app, with its lifespan (so the
migrations run), on the real PostgreSQL and Redis. Each response must not be a 5xx, and its status code, its
content type and its body must be the ones the description documents for that operation.

The path's `job_id` is, about half the time, one of a pool of real jobs, two in each status (queued through
POST /sanitize, the others moved on as a worker or a cancel would), so that reading, cancelling and deleting
a real job and fetching its metrics and model are fuzzed too, not only the 404 of an unknown id. Fuzzing
cancel and delete uses the pool up, so `test_every_job_operation_on_a_job_in_each_status` also calls each job
operation once on a fresh job in each status, and the model download's ranges and ETags get explicit cases.

Deterministic: Hypothesis is derandomized and has no example database. NAD_FUZZ_EXAMPLES sets the number of
random examples per operation (default 20); `scripts/fuzz.py` runs this module with a bigger one and reports
the numbers.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from schemathesis.errors import FailureGroup
from service_fixtures import REPORT, new_key

from api.app import create_app
from core import jobs
from core.database import Database
from core.settings import Settings
from core.storage import Storage, output_name

pytest_plugins = ["service_fixtures"]

EXAMPLES = int(os.environ.get("NAD_FUZZ_EXAMPLES", "20"))
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
JOB_OPERATIONS = (("GET", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/metrics"), ("GET", "/jobs/{job_id}/model"),
                  ("POST", "/jobs/{job_id}/cancel"), ("DELETE", "/jobs/{job_id}"))
CHECKPOINT = bytes(range(256)) * 8

# What the fuzzing sent and found, for `scripts/fuzz.py`: requests per operation, responses per (operation,
# status code), and each distinct failure as (operation, what failed, status code).
REQUESTS: Counter[str] = Counter()
ANSWERS: Counter[tuple[str, int]] = Counter()
FAILURES: set[tuple[str, str, int]] = set()
# Real job ids that the fuzzer's `job_id` is drawn from (filled by the `job_pool` fixture).
JOB_POOL: list[str] = []


def fuzz_config(max_examples: int, coverage: bool = True) -> schemathesis.Config:
    """Only the four checks this module is about; every phase but the stateful one (whose links the
    description does not declare), and the coverage one if not `coverage`; no randomness and no memory of
    earlier runs."""
    return schemathesis.Config.from_dict({
        "seed": 0,
        "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}, "coverage": {"enabled": coverage}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    })


def submit_job(client: TestClient, headers: dict[str, str]) -> str:
    """A queued job: POST /sanitize never opens the files, and no worker consumes the test queue."""
    response = client.post("/sanitize", headers=headers, data={"params": '{"arch": "wrn-16-1", "num_classes": 10}'},
                           files={"model": ("model.pt", b"checkpoint bytes"), "clean_data": ("c.zip", b"zip")})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_in(status: str, client: TestClient, headers: dict[str, str], settings: Settings) -> str:
    """A job of the key `headers` in `status`: submitted, then cancelled through the API, or moved on by
    writing the columns a worker would write (not through core.jobs' worker functions, whose signatures
    are not this module's concern)."""
    job_id = submit_job(client, headers)
    if status == "cancelled":
        assert client.post(f"/jobs/{job_id}/cancel", headers=headers).status_code == 200
    if status in ("queued", "cancelled"):
        return job_id
    stamp = jobs.now()
    values: dict[str, object] = {"status": status, "started_at": stamp, "attempts": 1}
    if status == "cancelling":
        values["cancel_requested_at"] = stamp
    elif status == "failed":
        values |= {"error": "the checkpoint is not a wrn-16-1; check params.arch", "finished_at": stamp}
    elif status == "succeeded":
        values |= {"report": REPORT, "progress": 1.0, "stage": "done", "finished_at": stamp}
        path = Storage(settings.storage_dir).output_path(job_id, 0)
        path.parent.mkdir(parents=True)
        path.write_bytes(CHECKPOINT)
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            job = session.get(jobs.Job, job_id)
            for name, value in values.items():
                setattr(job, name, value)
            if status == "succeeded":
                job.artifacts.append(jobs.Artifact(role=jobs.OUTPUT, path=output_name(0),
                                                   size=len(CHECKPOINT), sha256=hashlib.sha256(CHECKPOINT).hexdigest()))
    finally:
        db.dispose()
    return job_id


@pytest.fixture(scope="module")
def fuzz_settings(make_settings) -> Settings:
    """The API tests' settings, with a per-key cap on unfinished jobs the fuzzer never reaches (at the default
    cap almost every fuzzed upload would be refused, 429, before its body is read, and the multipart parser
    would go unfuzzed) and a file size cap it often does (so that the 413 of a part cut off mid-body is
    fuzzed too)."""
    return make_settings(max_queued_jobs=1_000_000, max_upload_bytes=200)


@pytest.fixture(scope="module")
def fuzz_client(fuzz_settings: Settings) -> Iterator[TestClient]:
    """The app with its lifespan run (migrations, upload sweep); the fuzzer reaches the same app in-process."""
    with TestClient(create_app(fuzz_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def fuzz_session(fuzz_client: TestClient) -> requests.Session:
    """schemathesis' in-process ASGI client (a requests session) of the running app."""
    return schemathesis.python.asgi.get_client(fuzz_client.app)


@pytest.fixture(scope="module")
def fuzz_key(fuzz_settings: Settings) -> dict[str, str]:
    return new_key(fuzz_settings, "fuzz")


@pytest.fixture
def job_pool(fuzz_client: TestClient, fuzz_key: dict[str, str], fuzz_settings: Settings) -> Iterator[list[str]]:
    """Two real jobs of the fuzzing key in each status, in JOB_POOL for the `job_id` hook below; new ones for
    each operation, since fuzzing cancel and delete uses them up."""
    JOB_POOL[:] = [job_in(status, fuzz_client, fuzz_key, fuzz_settings) for status in STATUSES for _ in range(2)]
    yield JOB_POOL
    JOB_POOL.clear()


def call_and_validate(case: schemathesis.Case, session: requests.Session,
                      headers: dict[str, str] | None) -> schemathesis.Response:
    """Send the case and run the checks, counting the request and recording what failed. In-process, an
    exception the app does not handle reaches here (a server would have answered it with a 500)."""
    REQUESTS[case.operation.label] += 1
    try:
        response = case.call(session=session, headers=headers)
    except Exception as error:
        FAILURES.add((case.operation.label, f"unhandled {type(error).__name__}: {error}".splitlines()[0], 500))
        raise
    ANSWERS[case.operation.label, response.status_code] += 1
    try:
        case.validate_response(response, headers=headers, transport_kwargs={"session": session})
    except FailureGroup as group:
        FAILURES.update((case.operation.label, failure.title, response.status_code) for failure in group.exceptions)
        raise
    return response


# The description as the app serves it. Making the app connects to nothing, so the schema is there at
# collection time; the requests go to the fixtures' app, which runs on the test databases.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi(), config=fuzz_config(EXAMPLES))
# Without a key every job operation answers 401 before it looks at anything else, so a tenth of the budget,
# and none of the coverage phase's hundreds of variations of the upload's body.
keyless_schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi(),
                                                config=fuzz_config(max(5, EXAMPLES // 10), coverage=False))


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict) -> st.SearchStrategy:
    """`job_id`: the generated string or, as often, one of the pool's real jobs."""
    if "job_id" not in (path_parameters or {}) or not JOB_POOL:
        return st.just(path_parameters)
    job_ids = st.one_of(st.just(path_parameters["job_id"]), st.sampled_from(JOB_POOL))
    return job_ids.map(lambda job_id: {**path_parameters, "job_id": job_id})


@schema.parametrize()
@pytest.mark.usefixtures("job_pool")
def test_fuzz_every_operation_with_a_valid_key(
    case: schemathesis.Case, fuzz_session: requests.Session, fuzz_key: dict[str, str]
) -> None:
    call_and_validate(case, fuzz_session, fuzz_key)


@keyless_schema.include(tag="jobs").parametrize()
def test_fuzz_the_job_operations_without_a_valid_key(case: schemathesis.Case, fuzz_session: requests.Session) -> None:
    """Whatever key (or none) the fuzzer sends, the answer is a documented 401 problem, never a 5xx."""
    call_and_validate(case, fuzz_session, None)


def test_every_job_operation_on_a_job_in_each_status(
    fuzz_client: TestClient, fuzz_session: requests.Session, fuzz_key: dict[str, str], fuzz_settings: Settings
) -> None:
    seen: set[tuple[str, int]] = set()
    for status in STATUSES:
        for method, path in JOB_OPERATIONS:
            job_id = job_in(status, fuzz_client, fuzz_key, fuzz_settings)
            case = schema[path][method].Case(path_parameters={"job_id": job_id})
            seen.add((f"{method} {path}", call_and_validate(case, fuzz_session, fuzz_key).status_code))
    # The answers a job in each status gets: its resource, its results, 409 for results it has not, cancel
    # (200 at once when queued, 202 when running) and delete.
    assert {("GET /jobs/{job_id}", 200), ("GET /jobs/{job_id}/metrics", 200), ("GET /jobs/{job_id}/metrics", 409),
            ("GET /jobs/{job_id}/model", 200), ("GET /jobs/{job_id}/model", 409),
            ("POST /jobs/{job_id}/cancel", 200), ("POST /jobs/{job_id}/cancel", 202),
            ("POST /jobs/{job_id}/cancel", 409), ("DELETE /jobs/{job_id}", 204),
            ("DELETE /jobs/{job_id}", 409)} <= seen


@pytest.mark.parametrize(("method", "path"), JOB_OPERATIONS)
def test_a_job_id_the_database_cannot_hold_names_no_job(
    fuzz_session: requests.Session, fuzz_key: dict[str, str], method: str, path: str
) -> None:
    """PostgreSQL refuses a NUL byte with an error rather than finding no row: still a 404, not a 500."""
    case = schema[path][method].Case(path_parameters={"job_id": "\x00"})
    assert call_and_validate(case, fuzz_session, fuzz_key).status_code == 404


@pytest.mark.parametrize(("headers", "expected"), [
    ({"range": "bytes=0-99"}, 206),
    ({"range": "bytes=-10", "if-none-match": '"not-its-etag"'}, 206),
    ({"range": "bytes=0-9, 100-109"}, 206),  # multipart/byteranges
    ({"if-none-match": f'"{hashlib.sha256(CHECKPOINT).hexdigest()}"'}, 304),
    ({"if-none-match": "*"}, 304),
    ({"range": f"bytes={len(CHECKPOINT)}-"}, 416),
    ({"range": "bytes=9-1"}, 400),
    ({"range": "bytes"}, 400),
    ({"range": "pages=1-2"}, 200),  # a unit it does not know is ignored (RFC 9110, 14.2)
    ({"range": ""}, 200),
])
def test_the_model_download_answers_ranges_and_etags_as_documented(
    fuzz_client: TestClient, fuzz_session: requests.Session, fuzz_key: dict[str, str], fuzz_settings: Settings,
    headers: dict[str, str], expected: int
) -> None:
    """The model's partial, not-modified and refused answers, which random headers seldom reach."""
    job_id = job_in("succeeded", fuzz_client, fuzz_key, fuzz_settings)
    case = schema["/jobs/{job_id}/model"]["GET"].Case(path_parameters={"job_id": job_id}, headers=headers)
    assert call_and_validate(case, fuzz_session, fuzz_key).status_code == expected
