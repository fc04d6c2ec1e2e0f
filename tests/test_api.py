"""The HTTP API against a real PostgreSQL database and a real Redis broker (no worker consumes its queue, so
submitted jobs stay queued unless a test moves them on through core.jobs, as a worker would)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from service_fixtures import PARAMS, REPORT, ROOT, free_port, fresh_postgres, new_key, problem, submit, taken_back
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from api.app import _can_be_invalid, create_app
from api.problems import _database_down
from core import jobs, keys
from core.database import Database
from core.params import PARAMS_LIMIT
from core.settings import Settings
from core.storage import LOCK_FILE, Storage, output_name
from worker.broker import make_celery
from worker.dispatch import send_job

pytest_plugins = ["service_fixtures"]

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def queue_length(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.broker_url)
    try:
        return client.llen(settings.queue)
    finally:
        client.close()


def job_ids(client: TestClient, headers: dict[str, str], **query: object) -> list[str]:
    return [job["id"] for job in client.get("/jobs", headers=headers, params=query).json()["items"]]


def leftovers(settings: Settings) -> list[Path]:
    """Files of uploads under way, and job folders without a job: a refused upload must leave neither."""
    incoming = [path for path in (settings.storage_dir / "incoming").rglob("*")
                if path.is_file() and path.name != LOCK_FILE]
    db = Database(settings.database_url)
    with db.session() as session:
        known = set(session.scalars(select(jobs.Job.id)))
    db.dispose()
    folders = settings.storage_dir / "jobs"
    return incoming + [path for path in folders.glob("*") if path.name not in known]


def finish(settings: Settings, job_id: str, checkpoint: bytes) -> None:
    """Do what a worker does when a job succeeds: write the checkpoint, store the report."""
    path = Storage(settings.storage_dir).output_path(job_id, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(checkpoint)
    db = Database(settings.database_url)
    with db.session() as session:
        jobs.start_attempt(session, job_id, dispatch=0, runner="a run")
        jobs.succeed(
            session,
            job_id,
            0,
            REPORT,
            jobs.FileRecord(
                jobs.OUTPUT,
                output_name(0),
                len(checkpoint),
                hashlib.sha256(checkpoint).hexdigest(),
            ),
        )
    db.dispose()


# What the API image (docker/api.Dockerfile) leaves out: the engine's dependencies.
ENGINE_ONLY = ("torch", "torchvision", "numpy", "PIL", "safetensors")
CHECK_IMPORTS = (
    f"import sys; leaked = [m for m in {ENGINE_ONLY} if m in sys.modules]; assert not leaked, leaked;"
)


def test_the_api_never_imports_torch(tmp_path: Path) -> None:
    code = f"import api.app, api.__main__; api.app.create_app(); {CHECK_IMPORTS}"
    env = {"NAD_DATABASE_URL": f"sqlite:///{tmp_path / 'nad.db'}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_python_m_api_serves_where_and_with_as_many_processes_as_its_settings_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nad_environment
) -> None:
    """NAD_API_HOST, NAD_API_PORT and NAD_API_WORKERS reach uvicorn (the host decides who can reach the API), and
    the database is migrated once before its processes start."""
    import runpy

    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append((app, options)))
    nad_environment(NAD_DATABASE_URL=f"sqlite:///{tmp_path / 'nad.db'}", NAD_API_HOST="10.1.2.3",
                    NAD_API_PORT="8123", NAD_API_WORKERS="3")
    runpy.run_module("api", run_name="__main__")
    assert served == [("api.app:create_app", {"factory": True, "host": "10.1.2.3", "port": 8123, "workers": 3})]
    assert (tmp_path / "nad.db").is_file()


def test_nad_keys_creates_a_working_key_and_nad_tidy_and_expire_run_without_importing_torch(
    api: TestClient, api_settings: Settings
) -> None:
    """All three run in the API's image, which has no torch."""
    create = ("from core.cli import main; code = main(['keys', 'create', '--name', 'ci']) or main(['tidy']) "
              "or main(['expire', '--days', '36500'])")
    code = f"{create}; {CHECK_IMPORTS} exit(code)"
    env = {"NAD_DATABASE_URL": api_settings.database_url, "NAD_STORAGE_DIR": str(api_settings.storage_dir),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    *_, key, tidied, expired = done.stdout.splitlines()
    assert f"job folders in {api_settings.storage_dir / 'jobs'} read against" in tidied
    assert expired.startswith("no job finished before ")
    assert api.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listed = subprocess.run(
        [sys.executable, "-m", "core.cli", "keys", "list"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert key.split("_")[1] in listed and "ci" in listed


def test_status_reads_work_on_sqlite_too(make_settings, tmp_path: Path) -> None:
    """The embedded default: reads go through aiosqlite, writes through the sqlite3 module, one file."""
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'nad.db'}")
    db = Database(settings.database_url)
    db.migrate()
    db.dispose()
    headers = new_key(settings)
    with TestClient(create_app(settings)) as client:
        job = submit(client, headers).json()
        assert client.get(f"/jobs/{job['id']}", headers=headers).json()["inputs"].keys() == {"model", "clean_data"}
        assert [item["id"] for item in client.get("/jobs", headers=headers).json()["items"]] == [job["id"]]
        assert "queued" in problem(client.get(f"/jobs/{job['id']}/metrics", headers=headers), 409)["detail"]


def test_health_and_readiness(api: TestClient, api_settings: Settings) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    assert list(api_settings.storage_dir.glob(".probe-*")) == []  # each probe removes the file it wrote


def test_readiness_names_what_is_down(api_settings: Settings, tmp_path: Path) -> None:
    down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_app(down)
    with TestClient(app) as client:
        assert "broker" in problem(client.get("/readyz"), 503)["detail"]
        services = app.state.services
        app.state.services = dataclasses.replace(
            services, db=Database(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing")
        )
        detail = problem(client.get("/readyz"), 503)["detail"]
        assert "database" in detail and "broker" in detail
        (tmp_path / "a file").write_bytes(b"")  # no folder can be made under it
        app.state.services = dataclasses.replace(services, storage=Storage(tmp_path / "a file"))
        assert "storage" in problem(client.get("/readyz"), 503)["detail"]
        app.state.services = services


def test_every_job_endpoint_needs_a_valid_key(api: TestClient, api_settings: Settings) -> None:
    for method, path in (
        ("GET", "/jobs"),
        ("POST", "/sanitize"),
        ("GET", "/jobs/x"),
        ("GET", "/jobs/x/model"),
        ("GET", "/jobs/x/metrics"),
        ("POST", "/jobs/x/cancel"),
        ("DELETE", "/jobs/x"),
    ):
        missing = problem(api.request(method, path), 401)
        assert "nad keys create" in missing["detail"]
        assert api.request(method, path).headers["www-authenticate"] == "Bearer"
        problem(api.request(method, path, headers={"Authorization": "Bearer nad_123_wrong"}), 401)
    header = new_key(api_settings)["Authorization"].removeprefix("Bearer ")
    assert api.get("/jobs", headers={"X-API-Key": header}).status_code == 200
    problem(api.get("/jobs", headers={"X-API-Key": header[:-1] + ("A" if header[-1] != "A" else "B")}), 401)


def revoke(settings: Settings, key: str) -> None:
    db = Database(settings.database_url)
    with db.session() as session:
        assert keys.revoke_key(session, key.split("_")[1])
    db.dispose()


@pytest.mark.parametrize("seconds", [0.0, 0.5])
def test_a_revoked_key_works_at_most_key_cache_seconds_longer(api_settings: Settings, seconds: float) -> None:
    settings = api_settings.model_copy(update={"key_cache_seconds": seconds})
    key = new_key(settings)["Authorization"].removeprefix("Bearer ")
    with TestClient(create_app(settings)) as client:
        assert client.get("/jobs", headers={"X-API-Key": key}).status_code == 200
        revoke(settings, key)
        if seconds:
            assert client.get("/jobs", headers={"X-API-Key": key}).status_code == 200  # remembered
            time.sleep(seconds)
        assert "revoked" in problem(client.get("/jobs", headers={"X-API-Key": key}), 401)["detail"]


def test_the_key_cache_keeps_digests_of_at_most_cache_size_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of keys (good ones: an operator's scripts make many) cannot grow an API process's memory."""
    monkeypatch.setattr(keys, "CACHE_SIZE", 2)
    cache = keys.KeyCache(60)
    for number in range(5):
        cache.put(f"nad_{number}_secret", str(number))
    assert len(cache._entries) <= 2 and cache.get("nad_4_secret") == "4"
    assert not any("secret" in digest for digest in cache._entries)


def test_without_auth_everyone_is_one_owner(api_settings: Settings) -> None:
    with TestClient(create_app(api_settings.model_copy(update={"auth_enabled": False}))) as client:
        job = submit(client, {}).json()
        assert job["id"] in job_ids(client, {})


def test_submit_stores_the_upload_records_the_job_and_sends_its_id(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    queued_before = queue_length(api_settings)
    response = submit(
        api,
        auth,
        params=PARAMS | {"epochs": 3},
        files={
            "model": ("../../etc/passwd", b"checkpoint bytes"),
            "clean_data": ("clean.zip", b"archive bytes"),
            "test_data": ("test.tar.gz", b"test bytes"),
        },
    )
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}" == job["links"]["self"]
    assert job["links"]["cancel"] == f"/jobs/{job['id']}/cancel" and "model" not in job["links"]
    assert job["status"] == "queued" and job["attempts"] == 0 and set(job["timestamps"]) == {"queued"}
    assert job["params"]["epochs"] == 3 and job["params"]["lr"] == 0.1  # validated, defaults filled in
    assert job["inputs"]["model"] == {
        "filename": "passwd",
        "size": 16,
        "sha256": hashlib.sha256(b"checkpoint bytes").hexdigest(),
    }
    folder = Storage(api_settings.storage_dir).job_dir(job["id"])
    assert {p.name: p.read_bytes() for p in (folder / "inputs").iterdir()} == {
        "model": b"checkpoint bytes",
        "clean_data": b"archive bytes",
        "test_data": b"test bytes",
    }
    assert queue_length(api_settings) == queued_before + 1
    raw = redis.Redis.from_url(api_settings.broker_url).lindex(api_settings.queue, 0)
    message = json.loads(raw)["headers"]
    assert message["task"] == "nad.sanitize" and message["id"] == f"{job['id']}-0"
    assert message["argsrepr"] == repr([job["id"], 0])
    assert api.get(job["links"]["self"], headers=auth).json()["id"] == job["id"]


def test_a_job_the_broker_cannot_take_is_not_kept(api_settings: Settings) -> None:
    down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0",
                                           "storage_dir": api_settings.storage_dir / "down"})
    with TestClient(create_app(down)) as client:
        headers = new_key(down)
        assert "send it again" in problem(submit(client, headers), 503)["detail"]
        assert job_ids(client, headers) == [] and leftovers(down) == []


def test_a_503_carries_every_header_the_description_says_it_always_has(api_settings: Settings) -> None:
    """Only the job database's outage answers 503 with Retry-After: a submit the broker refused, or a readiness
    probe, comes without, so the description must not call it required (a generated client would reject these
    answers, or wait for a header that never comes)."""
    down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0",
                                           "storage_dir": api_settings.storage_dir / "down-headers"})
    with TestClient(create_app(down)) as client:
        headers = new_key(down)
        for path, answer in (("/sanitize", submit(client, headers)), ("/readyz", client.get("/readyz"))):
            problem(answer, 503)
            assert set(required_headers(client, path, answer)) <= set(answer.headers), path


def test_a_broker_that_accepts_connections_but_never_answers_is_down_not_waited_on(api_settings: Settings) -> None:
    """A stopped Redis on a live host, a stalled VM: connections open, no answer ever comes. Each submit and
    readiness probe once held an API thread for ever (40 probes took the whole pool); now they answer 503.
    Socket timeouts bound it, not a test clock: the join only keeps a regression from hanging the suite."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes connections into the backlog; nothing reads or answers them
        down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                                               "storage_dir": api_settings.storage_dir / "silent"})
        failed: list[Exception] = []  # first without the API: a hang here fails the test instead of hanging it

        def send() -> None:
            try:
                send_job(make_celery(down), jobs.new_job_id(), 0)
            except Exception as error:
                failed.append(error)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(60)
        assert failed, "sending a job to a broker that never answers did not end"
        with TestClient(create_app(down)) as client:
            headers = new_key(down)
            answers: list[httpx.Response] = []
            calls = (lambda: submit(client, headers), lambda: client.get("/readyz"))
            threads = [threading.Thread(target=lambda call=call: answers.append(call()), daemon=True) for call in calls]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(answer.status_code for answer in answers) == [503, 503]
            assert job_ids(client, headers) == [] and leftovers(down) == []
            assert client.get("/healthz").status_code == 200


def test_an_upload_that_cannot_be_moved_into_place_is_not_left_behind(api_settings: Settings) -> None:
    """The job folder cannot be made (here a file stands where the folder of job folders goes; in life, a
    full disk): the received upload is discarded at once, not left under incoming/ until a restart."""
    blocked = api_settings.model_copy(update={"storage_dir": api_settings.storage_dir / "blocked"})
    with TestClient(create_app(blocked), raise_server_exceptions=False) as client:
        blocked.storage_dir.mkdir(parents=True, exist_ok=True)
        (blocked.storage_dir / "jobs").write_bytes(b"not a folder")
        headers = new_key(blocked)
        assert submit(client, headers).status_code == 500
        assert job_ids(client, headers) == [] and leftovers(blocked) == []


def test_a_retried_submit_with_the_same_idempotency_key_returns_the_same_job(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    queued_before = queue_length(api_settings)
    first = submit(api, auth, **{"Idempotency-Key": "upload-7"})
    again = submit(api, auth, **{"Idempotency-Key": "upload-7"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["location"] == first.headers["location"]
    assert job_ids(api, auth) == [first.json()["id"]] and queue_length(api_settings) == queued_before + 1
    assert leftovers(api_settings) == []  # the retried upload was discarded
    # The key again with other parameters or another file is another request: refused, not given the first job.
    for changed in ({"params": PARAMS | {"epochs": 2}},
                    {"files": {"model": ("model.pt", b"other bytes"), "clean_data": ("clean.zip", b"archive bytes")}}):
        detail = problem(submit(api, auth, **changed, **{"Idempotency-Key": "upload-7"}), 422)["detail"]
        assert f"was used for job {first.json()['id']}, which was sent with other parameters or files" in detail
    assert job_ids(api, auth) == [first.json()["id"]] and leftovers(api_settings) == []
    other = new_key(api_settings)
    assert submit(api, other, **{"Idempotency-Key": "upload-7"}).json()["id"] != first.json()["id"]
    # An empty key (a template's unset variable) names no upload: refused, not taken for another's first job.
    body = problem(submit(api, auth, **{"Idempotency-Key": ""}), 422)
    assert [error["field"] for error in body["errors"]] == ["idempotency-key"], body
    assert job_ids(api, auth) == [first.json()["id"]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"arch": "wrn-16-1", "num_classes": 10, "epochs": 0}, "params.epochs"),
        ({"arch": "wrn-16-1"}, "params.num_classes"),
        (
            {
                "arch": "wrn-16-1",
                "num_classes": 10,
                "trigger": {"type": "sig", "amplitude": 20, "frequency": 6},
            },
            "params",
        ),
        ({"arch": "wrn-16-1", "num_classes": 10, "bogus": 1}, "params.bogus"),
        # a method runs once: its progress share and report row are named by it
        ({"arch": "wrn-16-1", "num_classes": 10, "auto_candidates": ["fst", "sau", "fst"]}, "params.auto_candidates"),
        ({"arch": "wrn-16-1", "num_classes": 2, "classes": ["cat", "cat"]}, "params.classes"),
        # a pattern file's name, as the command line takes it: the service says it wants the pixels
        ({"arch": "wrn-16-1", "num_classes": 10, "target_label": 1,
          "trigger": {"type": "blend", "pattern": "noise.npz:blend", "alpha": 0.15}}, "params.trigger.blend.pattern"),
        ("{not json", "params"),
        (json.dumps(PARAMS) + " " * PARAMS_LIMIT, "params"),  # JSON, but past the cap `nad` reads files to too
    ],
)
def test_invalid_params_are_422_naming_the_field(
    api: TestClient, api_settings: Settings, auth: dict[str, str], params: object, field: str
) -> None:
    body = problem(submit(api, auth, params=params), 422)
    assert [error["field"] for error in body["errors"]] == [field] and body["detail"].startswith(field)
    assert "Value error" not in body["detail"]  # pydantic's prefix to a validator's own words
    assert job_ids(api, auth) == [] and leftovers(api_settings) == []


def test_a_teacher_for_a_method_that_uses_none_is_422(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    """It was stored, loaded by the worker and ignored without a word."""
    files = {"model": ("m.pt", b"m"), "clean_data": ("c.zip", b"c"), "teacher": ("t.pt", b"t")}
    for method in ({"method": "fst"}, {"method": "auto", "auto_candidates": ["sau", "fst"]}):
        body = problem(submit(api, auth, params=PARAMS | method, files=files), 422)
        assert [error["field"] for error in body["errors"]] == ["teacher"]
        assert body["detail"].startswith(f"teacher: method {method['method']} uses no teacher")
    assert job_ids(api, auth) == [] and leftovers(api_settings) == []
    # nad distils from it, finetune is it, and auto runs either as a candidate with it
    for method in ({"method": "nad"}, {"method": "finetune"},
                   {"method": "auto", "auto_candidates": ["fst", "finetune"]}):
        assert submit(api, auth, params=PARAMS | method, files=files).status_code == 202, method


def test_missing_unknown_repeated_and_empty_parts_are_422(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    cases = {
        "model": {"clean_data": ("c.zip", b"c")},
        "weights": {"model": ("m.pt", b"m"), "clean_data": ("c.zip", b"c"), "weights": ("w", b"w")},
        "clean_data": {"model": ("m.pt", b"m"), "clean_data": ("c.zip", b"")},
    }
    for field, files in cases.items():
        body = problem(submit(api, auth, files=files), 422)
        assert [error["field"] for error in body["errors"]] == [field]
    twice = [("model", ("m.pt", b"m")), ("model", ("m.pt", b"m")), ("clean_data", ("c.zip", b"c"))]
    response = api.post("/sanitize", headers=auth, files=twice, data={"params": json.dumps(PARAMS)})
    assert "sent twice" in problem(response, 422)["detail"]
    files = {"model": ("m.pt", b"m"), "clean_data": ("c.zip", b"c")}
    both = {"params": [json.dumps(PARAMS), json.dumps(PARAMS | {"epochs": 1})]}  # which would the job run?
    body = problem(api.post("/sanitize", headers=auth, files=files, data=both), 422)
    assert [error["field"] for error in body["errors"]] == ["params"] and "sent twice" in body["detail"]
    body = problem(api.post("/sanitize", headers=auth, files=files), 422)
    assert [error["field"] for error in body["errors"]] == ["params"] and "missing" in body["detail"]
    assert job_ids(api, auth) == [] and leftovers(api_settings) == []


def test_the_clients_file_name_is_shown_printable_and_at_most_255_characters(
    api: TestClient, auth: dict[str, str]
) -> None:
    """For display only: a terminal escape in it, or a name of any length, reaches no listing as sent."""
    def part(name: str, filename: bytes, content: bytes) -> bytes:
        return (b'--XyZ\r\nContent-Disposition: form-data; name="' + name.encode() + b'"; filename="' + filename
                + b'"\r\n\r\n' + content + b"\r\n")

    body = (part("model", b"evil\x1b[2J\x7fname.pt", b"m") + part("clean_data", b"c" * 300 + b".zip", b"c")
            + b'--XyZ\r\nContent-Disposition: form-data; name="params"\r\n\r\n' + json.dumps(PARAMS).encode()
            + b"\r\n--XyZ--\r\n")
    response = api.post("/sanitize", headers=auth | {"Content-Type": "multipart/form-data; boundary=XyZ"},
                        content=body)
    assert response.status_code == 202, response.text
    inputs = response.json()["inputs"]
    assert inputs["model"]["filename"] == "evil[2Jname.pt" and inputs["clean_data"]["filename"] == "c" * 255


def test_a_body_that_is_not_multipart_is_415(api: TestClient, auth: dict[str, str]) -> None:
    assert "multipart/form-data" in problem(api.post("/sanitize", headers=auth, json=PARAMS), 415)["detail"]
    # multipart, but a Content-Type set by hand names no boundary: not told to send what it sent
    by_hand = api.post("/sanitize", headers=auth | {"Content-Type": "multipart/form-data"}, content=b"--x--")
    assert "names no boundary" in problem(by_hand, 400)["detail"]


def test_an_upload_past_the_size_cap_is_413_and_leaves_nothing(api_settings: Settings) -> None:
    small = api_settings.model_copy(
        update={"max_upload_bytes": 1000, "storage_dir": api_settings.storage_dir / "cap"}
    )
    with TestClient(create_app(small)) as client:
        headers = new_key(small)
        files = {"model": ("model.pt", b"x" * 5000), "clean_data": ("clean.zip", b"y" * 10)}
        body = problem(submit(client, headers, files=files), 413)
        assert "model" in body["detail"] and "1000 bytes" in body["detail"]
        assert job_ids(client, headers) == [] and leftovers(small) == []
        at_the_cap = {"model": ("m", b"x" * 1000), "clean_data": ("c", b"y")}
        assert submit(client, headers, files=at_the_cap).status_code == 202
        params_at_their_cap = json.dumps(PARAMS).ljust(PARAMS_LIMIT)  # PARAMS_LIMIT bytes: taken, as `nad` does
        assert submit(client, headers, params=params_at_their_cap).status_code == 202


def test_a_body_cut_short_leaves_no_job_and_no_file(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    cut = (
        b'--XyZ\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        + json.dumps(PARAMS).encode()
        + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="model"; filename="m.pt"\r\n\r\n'
        + b"m" * 5000
    )
    response = api.post(
        "/sanitize", headers=auth | {"Content-Type": "multipart/form-data; boundary=XyZ"}, content=cut
    )
    assert "closing boundary" in problem(response, 400)["detail"]
    assert job_ids(api, auth) == [] and leftovers(api_settings) == []


def test_a_job_and_its_files_are_invisible_to_other_keys(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    job_id = submit(api, auth).json()["id"]
    finish(api_settings, job_id, b"cleansed weights")
    other = new_key(api_settings)
    for method, path in (
        ("GET", ""),
        ("GET", "/metrics"),
        ("GET", "/model"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ):
        assert job_id in problem(api.request(method, f"/jobs/{job_id}{path}", headers=other), 404)["detail"]
    for not_an_id in ("%00", f"{job_id[:-1]}%00"):  # never sent to the database (a NUL breaks it)
        problem(api.get(f"/jobs/{not_an_id}", headers=auth), 404)
    assert job_ids(api, other) == []
    assert api.get(f"/jobs/{job_id}/model", headers=auth).content == b"cleansed weights"


def test_listing_is_paginated_newest_first_and_filtered_by_status(
    api: TestClient, auth: dict[str, str]
) -> None:
    created = [submit(api, auth).json()["id"] for _ in range(3)]
    api.post(f"/jobs/{created[0]}/cancel", headers=auth)
    first = api.get("/jobs", headers=auth, params={"limit": 2}).json()
    assert [job["id"] for job in first["items"]] == created[:0:-1] and first["next_cursor"]
    second = api.get("/jobs", headers=auth, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [job["id"] for job in second["items"]] == [created[0]] and second["next_cursor"] is None
    assert job_ids(api, auth, status="cancelled") == [created[0]]
    assert job_ids(api, auth, status="queued") == created[:0:-1]
    assert job_ids(api, auth, status=["cancelled", "queued"]) == created[::-1]  # it took the last one alone
    for limit in (0, 101):  # at most 100 a page
        assert problem(api.get("/jobs", headers=auth, params={"limit": limit}), 422)["errors"][0]["field"] == "limit"
    assert (
        problem(api.get("/jobs", headers=auth, params={"status": "done"}), 422)["errors"][0]["field"]
        == "status.0"  # the first of the statuses asked for
    )


def test_cancel_a_queued_job_then_delete_it_with_its_files(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    job_id = submit(api, auth).json()["id"]
    folder = Storage(api_settings.storage_dir).job_dir(job_id)
    assert "cancel it first" in problem(api.delete(f"/jobs/{job_id}", headers=auth), 409)["detail"]
    cancelled = api.post(f"/jobs/{job_id}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert set(cancelled.json()["timestamps"]) == {"queued", "cancelled"} and cancelled.json()["links"] == {
        "self": f"/jobs/{job_id}"}
    assert api.post(f"/jobs/{job_id}/cancel", headers=auth).status_code == 200  # cancelling twice is harmless
    assert "cancelled" in problem(api.get(f"/jobs/{job_id}/metrics", headers=auth), 409)["detail"]
    problem(api.get(f"/jobs/{job_id}/model", headers=auth), 409)
    assert folder.is_dir()
    assert api.delete(f"/jobs/{job_id}", headers=auth).status_code == 204
    assert not folder.exists()
    problem(api.get(f"/jobs/{job_id}", headers=auth), 404)


def test_cancelling_a_job_queued_again_after_its_worker_died_removes_what_the_killed_run_wrote(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    """The job ends with no run of its own, and the killed run's checkpoint stayed until the job was deleted
    (the review of the sweeper's ends)."""
    job_id = submit(api, auth).json()["id"]
    storage, db = Storage(api_settings.storage_dir), Database(api_settings.database_url)
    with db.session() as session:
        jobs.start_attempt(session, job_id, dispatch=0, runner="a run")
    killed = storage.output_path(job_id, 0)
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"half a checkpoint")
    assert taken_back(db, job_id, 0) == "queued"
    db.dispose()
    assert api.post(f"/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    assert not killed.parent.exists() and storage.path(job_id, "inputs/model").is_file()


def test_cancelling_a_running_job_leaves_its_run_the_checkpoint_it_writes(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    """A running job becomes cancelling and its run ends it: the folder it writes in is the run's to remove, at
    its end. Removed under it, the run would fail on its rename, and the job its owner cancelled end failed, an
    internal error."""
    job_id = submit(api, auth).json()["id"]
    storage, db = Storage(api_settings.storage_dir), Database(api_settings.database_url)
    with db.session() as session:
        jobs.start_attempt(session, job_id, dispatch=0, runner="a run")
    db.dispose()
    being_written = storage.output_path(job_id, 0).with_name(".tmpX7q2")  # safetensors' file before its rename
    being_written.parent.mkdir(parents=True)
    being_written.write_bytes(b"half a checkpoint")
    cancelling = api.post(f"/jobs/{job_id}/cancel", headers=auth).json()
    assert cancelling["status"] == "cancelling" and cancelling["attempts"] == 1
    assert being_written.read_bytes() == b"half a checkpoint"


def test_deleting_a_job_being_cancelled_says_to_wait_not_to_cancel_it(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    job_id = submit(api, auth).json()["id"]
    db = Database(api_settings.database_url)
    with db.session() as session:
        jobs.start_attempt(session, job_id, dispatch=0, runner="a run")
    db.dispose()
    assert api.post(f"/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelling"
    detail = problem(api.delete(f"/jobs/{job_id}", headers=auth), 409)["detail"]
    assert f"is cancelling; delete it once GET /jobs/{job_id} shows it cancelled" in detail


def test_a_succeeded_job_serves_its_metrics_and_its_model_with_etag_and_ranges(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    job_id = submit(api, auth).json()["id"]
    assert "queued" in problem(api.get(f"/jobs/{job_id}/metrics", headers=auth), 409)["detail"]
    weights = bytes(range(256)) * 40
    finish(api_settings, job_id, weights)
    assert "succeeded" in problem(api.post(f"/jobs/{job_id}/cancel", headers=auth), 409)["detail"]
    assert api.get(f"/jobs/{job_id}/metrics", headers=auth).json() == REPORT | {"job_id": job_id}
    job = api.get(f"/jobs/{job_id}", headers=auth).json()
    assert (
        job["output"]["sha256"] == hashlib.sha256(weights).hexdigest() and job["progress"]["percent"] == 100
    )
    # the name the download gives it, and what can be done now: no cancel, the metrics and the model
    assert job["output"]["filename"] == f"{job_id}.safetensors" and set(job["links"]) == {"self", "metrics", "model"}
    assert set(job["inputs"]) == {"model", "clean_data"}  # the output is no upload

    whole = api.get(f"/jobs/{job_id}/model", headers=auth)
    etag = f'"{hashlib.sha256(weights).hexdigest()}"'
    assert whole.content == weights and whole.headers["etag"] == etag
    assert whole.headers["content-disposition"] == f'attachment; filename="{job_id}.safetensors"'
    assert whole.headers["accept-ranges"] == "bytes"
    part = api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": "bytes=100-1123"})
    assert part.status_code == 206 and part.content == weights[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{len(weights)}"
    tail_part = api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": "bytes=-10", "If-Range": etag})
    assert tail_part.status_code == 206 and tail_part.content == weights[-10:]
    assert api.get(f"/jobs/{job_id}/model", headers=auth | {"If-None-Match": etag}).status_code == 304
    # If-Match: only a strong match (or *) is served; another copy's ETag, or a weak one, is a 412
    assert api.get(f"/jobs/{job_id}/model", headers=auth | {"If-Match": f'"x", {etag}'}).content == weights
    assert api.get(f"/jobs/{job_id}/model", headers=auth | {"If-Match": "*"}).status_code == 200
    for other in ('"x"', f"W/{etag}"):
        assert etag in problem(api.get(f"/jobs/{job_id}/model", headers=auth | {"If-Match": other}), 412)["detail"]
    # weak comparison: a proxy that compresses the file hands the client W/"..."
    assert api.get(f"/jobs/{job_id}/model", headers=auth | {"If-None-Match": f'"x", W/{etag}'}).status_code == 304
    unsatisfiable = api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": f"bytes={len(weights)}-"})
    assert problem(unsatisfiable, 416) and unsatisfiable.headers["content-range"] == f"bytes */{len(weights)}"
    problem(api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": "bytes=9-1"}), 400)
    # a range in a unit the server does not know is ignored (RFC 9110, 14.2): the whole file
    assert api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": "pages=1-2"}).content == weights
    # a resume of another copy (a job's file of before, longer) gets the whole of this one, not a 416
    stale = api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": f"bytes={len(weights)}-", "If-Range": '"x"'})
    assert stale.status_code == 200 and stale.content == weights
    # If-Range may name the copy by its Last-Modified date instead: then its Range is checked, as a problem
    dated = {"If-Range": whole.headers["last-modified"]}
    assert api.get(f"/jobs/{job_id}/model", headers=auth | dated | {"Range": "bytes=-10"}).content == weights[-10:]
    problem(api.get(f"/jobs/{job_id}/model", headers=auth | dated | {"Range": "bytes=9-1"}), 400)
    headers_only = api.head(f"/jobs/{job_id}/model", headers=auth)
    assert headers_only.status_code == 200 and headers_only.content == b""
    assert headers_only.headers["etag"] == etag and headers_only.headers["content-length"] == str(len(weights))
    assert api.head(f"/jobs/{job_id}/model", headers=auth | {"If-None-Match": etag}).status_code == 304
    assert api.head(f"/jobs/{job_id}/model").status_code == 401
    several = api.get(f"/jobs/{job_id}/model", headers=auth | {"Range": "bytes=0-9, 20-29"})
    assert several.headers["content-type"].startswith("multipart/byteranges")
    current = api.get(f"/jobs/{job_id}/model", headers=auth | {"If-None-Match": etag})
    for answer in (whole, part, several, current, headers_only):  # each header the description says it has
        assert set(required_headers(api, "/jobs/{job_id}/model", answer)) <= set(answer.headers), answer


def required_headers(api: TestClient, path: str, answer: httpx.Response) -> list[str]:
    """The headers that the OpenAPI description says `answer` (a response to `path`) always has, in lower case."""
    operation = api.get("/openapi.json").json()["paths"][path][answer.request.method.lower()]
    headers = operation["responses"][str(answer.status_code)].get("headers", {})
    return [name.lower() for name, header in headers.items() if header.get("required")]


def test_unknown_routes_wrong_methods_and_unexpected_errors_are_problems(
    api_settings: Settings, auth: dict[str, str]
) -> None:
    app = create_app(api_settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError(f"secret detail at {ROOT}")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert "/docs" in problem(client.get("/nowhere"), 404)["detail"]
        wrong = client.put("/sanitize", headers=auth)
        assert "POST" in problem(wrong, 405)["detail"] and wrong.headers["allow"] == "POST"
        # every method of the path, where Starlette named those of its first route alone (GET)
        job = "/jobs/0123456789abcdef0123456789abcdef"
        for path, allowed in ((job, "DELETE, GET"), (f"{job}/model", "GET, HEAD"), ("/docs", "GET, HEAD")):
            wrong = client.put(path, headers=auth)
            assert problem(wrong, 405)["detail"].endswith(f"allowed: {allowed}") and wrong.headers["allow"] == allowed
        problem(client.get("/jobs/0123456789abcdef0123456789abcdef", headers=auth), 404)
        crashed = problem(client.get("/boom"), 500)
        assert "secret" not in crashed["detail"] and "internal error" in crashed["detail"]


def test_a_database_outage_is_a_503_a_client_waits_out(make_settings) -> None:
    """Not a 500 that asks for a bug report: `nad submit` retries a 503. The API's own database is dropped
    under it, its connections with it (the shared PostgreSQL server cannot be stopped for a test)."""
    database = fresh_postgres()
    settings = make_settings(database_url=next(database))
    with TestClient(create_app(settings)) as client:
        headers = new_key(settings)
        assert client.get("/jobs", headers=headers).status_code == 200
        next(database, None)  # DROP DATABASE ... WITH (FORCE)
        for down in (client.get("/jobs", headers=headers), submit(client, headers)):
            assert "database is unreachable right now" in problem(down, 503)["detail"]
            assert down.headers["retry-after"] == "30"


def test_a_database_that_accepts_connections_but_never_answers_is_down_within_seconds() -> None:
    """As for the broker above: a stalled PostgreSQL host, or a proxy before a dead one. Without a connect
    timeout libpq waited over two minutes for each connection, so every request of the API did; now both of
    its ways to the database give up after CONNECT_TIMEOUT, with an error the API answers 503 for. The join
    only keeps a regression from hanging the suite."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        database = Database(f"postgresql+psycopg://nad@127.0.0.1:{silent.getsockname()[1]}/nad")
        failed: list[Exception] = []

        async def read() -> None:
            async with database.read() as session:
                await session.execute(text("SELECT 1"))

        def attempt(call: Callable[[], object]) -> None:
            try:
                call()
            except Exception as error:
                failed.append(error)

        calls = (database.ping, lambda: asyncio.run(read()))
        threads = [threading.Thread(target=attempt, args=(call,), daemon=True) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(failed) == 2 and all(isinstance(error, DBAPIError) and _database_down(error) for error in failed)
        database.dispose()


def test_database_connections_carry_libpq_s_timeouts_unless_the_url_sets_its_own(make_settings) -> None:
    """On a real connection, as libpq reports it: a host lost mid-job fails its connection within a minute."""
    url = make_settings().database_url

    async def read(database: Database) -> dict[str, str]:  # the API's reads go by the asyncio engine
        async with database.read() as session:
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            return raw.driver_connection.info.get_parameters()

    for given, idle in ((url, "30"), (f"{url}?keepalives_idle=7", "7")):
        database = Database(given)
        with database.engine.connect() as connection:
            blocking = connection.connection.dbapi_connection.info.get_parameters()
        for parameters in (blocking, asyncio.run(read(database))):
            assert (parameters["connect_timeout"], parameters["keepalives_idle"]) == ("5", idle)
            assert parameters["tcp_user_timeout"] == "30000"
        database.dispose()


def test_a_statement_the_database_refuses_is_a_500_not_an_outage(make_settings, tmp_path: Path) -> None:
    """SQLite calls a missing table operational too: retrying would not help, so no 503 says it would."""
    path = tmp_path / "nad.db"
    settings = make_settings(database_url=f"sqlite:///{path}")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = new_key(settings)
        with sqlite3.connect(path) as connection:
            connection.execute("DROP TABLE artifacts")
            connection.execute("DROP TABLE jobs")
        assert "internal error" in problem(client.get("/jobs", headers=headers), 500)["detail"]


def test_an_outage_is_told_from_a_refused_statement_by_the_drivers_error(
    api_settings: Settings, tmp_path: Path
) -> None:
    """503 for a database that cannot answer now: SQLite busy (another process's write), PostgreSQL shutting down
    or starting (57P01-57P03), a connection lost (class 08, or one SQLAlchemy invalidated), or a driver's error of
    the connection (InterfaceError); a statement refused (a missing table) is a 500."""
    import psycopg.errors

    path = tmp_path / "nad.db"
    holder, other = sqlite3.connect(path), sqlite3.connect(path, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as busy:
        other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as no_table:
        other.execute("SELECT * FROM jobs")
    holder.close()
    other.close()

    def error(orig: Exception, invalidated: bool = False) -> DBAPIError:
        return OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)

    lookup = psycopg.errors.lookup
    assert all(_database_down(error(orig)) for orig in (busy.value, *(lookup(state)("down") for state in (
        "57P01", "57P02", "57P03", "08006"))))
    assert _database_down(error(lookup("42P01")("gone"), invalidated=True))
    assert not any(_database_down(error(orig)) for orig in (no_table.value, lookup("42P01")("no such table")))
    app = create_app(api_settings)

    @app.get("/lost")
    def lost() -> None:
        raise InterfaceError("SELECT 1", {}, psycopg.errors.InterfaceError("the connection is lost"))

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/lost")
        assert "unreachable right now" in problem(answer, 503)["detail"] and answer.headers["retry-after"] == "30"


def test_the_openapi_description_documents_the_upload_and_the_problems(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    assert spec["info"]["version"] == PROJECT_VERSION  # pyproject.toml's, not a copy of it
    upload = spec["paths"]["/sanitize"]["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["model", "clean_data", "params"]
    assert form["properties"]["model"]["format"] == "binary" and form["properties"]["params"]["examples"]
    assert {"202", "401", "413", "422"} <= set(upload["responses"])
    assert upload["responses"]["413"]["content"]["application/problem+json"]["schema"]["$ref"].endswith(
        "Problem"
    )
    schemas = spec["components"]["schemas"]
    assert {"Problem", "SanitizeParams", "JobResource", "Metrics", "BadNetsTrigger"} <= set(schemas)
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    assert not {"HTTPValidationError", "ValidationError"} & set(schemas)  # FastAPI's 422 shape, never sent
    for path in spec["paths"].values():
        for operation in path.values():
            validation = operation["responses"].get("422", {}).get("content", {})
            assert "application/json" not in validation  # FastAPI's own shape: every error is a problem
    # a 422 only where something can be invalid: a job id that names no job is a 404
    assert "422" in spec["paths"]["/jobs"]["get"]["responses"]
    for path, operations in spec["paths"].items():
        if path.startswith("/jobs/"):
            assert all("422" not in operation["responses"] for operation in operations.values()), path
    assert upload["responses"]["202"]["headers"]["Location"]["required"]
    path_id = {"in": "path", "name": "job_id", "required": True, "schema": {"type": "string", "title": "Job Id"}}
    assert not _can_be_invalid({"parameters": [path_id]})
    assert _can_be_invalid({"parameters": [path_id, path_id | {"in": "header", "name": "token"}]})  # left out
    assert upload["responses"]["429"]["headers"]["Retry-After"]["required"]


def test_an_operation_with_a_body_keeps_its_422_whatever_its_parameters() -> None:
    """A body can always be invalid: an upload route keeps its 422 with no parameter, or with a path's alone
    (the submit's Idempotency-Key, a header of its own constraints, is what keeps it today)."""
    path_id = {"in": "path", "name": "job_id", "required": True, "schema": {"type": "string", "title": "Job Id"}}
    body = {"content": {"multipart/form-data": {"schema": {"type": "object"}}}, "required": True}
    assert _can_be_invalid({"requestBody": body})
    assert _can_be_invalid({"requestBody": body, "parameters": [path_id]})
