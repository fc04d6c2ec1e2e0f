"""The whole service with real parts: a Celery worker process on Redis, PostgreSQL, the real engine, and the
API in-process or as a uvicorn process, sanitizing the real backdoored model of the `digits_backdoor` fixture.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from service_fixtures import FINISHED, ROOT, ServiceProcess, free_port, new_key, start_api, start_worker, wait_for
from test_checkpoints import Payload
from test_hostile_files import _entry, _png, _safetensors, _zip

from api.app import create_app
from core.client import Client, ServiceError
from core.database import Database
from core.engine.sanitize import evaluate_checkpoint
from core.jobs import INTERNAL_ERROR, Job, new_job_id, runner_place
from core.params import SanitizeParams
from core.settings import Settings
from core.storage import LOCK_FILE, Storage

pytest_plugins = ["service_fixtures"]

# Small enough for two cores; the fixture's own epochs are what takes the backdoor out.
SHORT = {"teacher_epochs": 2, "epochs": 3}
# Long enough that a test can act on the job while it runs.
LONG = {"teacher_epochs": 200, "epochs": 200}


def upload(case) -> dict:
    """The multipart files of a digits job."""
    return {
        "model": ("backdoored.safetensors", case.checkpoint.read_bytes()),
        "clean_data": ("clean.npz", case.clean.read_bytes()),
        "test_data": ("test.npz", case.test.read_bytes()),
    }


def submit(client: TestClient, headers: dict[str, str], case, files: dict | None = None, **overrides) -> str:
    """A digits job, its `files` in place of the case's own and `overrides` over its params."""
    response = client.post(
        "/sanitize",
        headers=headers,
        files=upload(case) | (files or {}),
        data={"params": json.dumps(case.params | overrides)},
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def training(job: dict) -> bool:
    """The job is running and inside a training epoch, where the worker can be interrupted."""
    return job["status"] == "running" and job["progress"]["stage"] in ("teacher", "student")


def measured(checkpoint: Path, case) -> dict:
    """ACC and ASR of a checkpoint as the engine measures them, outside the service."""
    metrics, _ = evaluate_checkpoint(checkpoint, case.test, SanitizeParams.model_validate(case.params), None)
    return metrics


def test_a_backdoored_model_comes_back_cleansed(
    stack: TestClient, stack_settings: Settings, worker: ServiceProcess, digits_backdoor, tmp_path: Path
) -> None:
    headers = new_key(stack_settings)
    job_id = submit(stack, headers, digits_backdoor)
    job = wait_for(stack, job_id, headers, log=worker.log)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"] == {
        "stage": "done",
        "epoch": None,
        "epochs": None,
        "percent": 100.0,
    }
    stamps = job["timestamps"]
    assert list(stamps) == ["queued", "running", "succeeded"] and sorted(stamps.values()) == list(
        stamps.values()
    )

    download = stack.get(f"/jobs/{job_id}/model", headers=headers)
    digest = hashlib.sha256(download.content).hexdigest()
    assert download.headers["etag"] == f'"{digest}"' and job["output"]["sha256"] == digest
    checkpoint = tmp_path / "cleansed.safetensors"
    checkpoint.write_bytes(download.content)

    metrics = stack.get(f"/jobs/{job_id}/metrics", headers=headers).json()
    again = measured(checkpoint, digits_backdoor)
    assert metrics["after"]["acc"] == pytest.approx(again["acc"], abs=0.01)
    assert metrics["after"]["asr"] == pytest.approx(again["asr"], abs=0.01)
    assert metrics["before"]["asr"] > 80, "the fixture's model should carry a working backdoor"
    assert again["asr"] < 20, f"the backdoor survived: ASR {again['asr']}"
    params = digits_backdoor.params
    assert len(metrics["history"]) == params["teacher_epochs"] + params["epochs"]
    assert metrics["input_sha256"] == hashlib.sha256(digits_backdoor.checkpoint.read_bytes()).hexdigest()
    assert metrics["nad_version"] == importlib.metadata.version("nad-service")
    assert metrics["evaluation"]["test_source"] == "test_data"


def test_a_running_job_stops_at_an_epoch_boundary_when_cancelled(
    stack: TestClient, stack_settings: Settings, worker: ServiceProcess, digits_backdoor
) -> None:
    headers = new_key(stack_settings)
    job_id = submit(stack, headers, digits_backdoor, **LONG)
    wait_for(stack, job_id, headers, done=training, log=worker.log)
    cancelling = stack.post(f"/jobs/{job_id}/cancel", headers=headers)
    assert cancelling.status_code == 202 and cancelling.json()["status"] == "cancelling"
    job = wait_for(stack, job_id, headers, timeout=120, log=worker.log)
    assert job["status"] == "cancelled" and job["output"] is None
    assert list(job["timestamps"]) == ["queued", "running", "cancelling", "cancelled"]
    assert written_by_the_worker(Storage(stack_settings.storage_dir), job_id) == []
    assert stack.get(f"/jobs/{job_id}/metrics", headers=headers).status_code == 409
    assert stack.delete(f"/jobs/{job_id}", headers=headers).status_code == 204


def killed_mid_job(client: TestClient, settings: Settings, worker: ServiceProcess, backdoor) -> dict:
    """A job whose worker's pool process is killed while it trains, as the kernel's OOM killer would, waited
    for to its end."""
    headers = new_key(settings)
    job_id = submit(client, headers, backdoor, **SHORT)
    wait_for(client, job_id, headers, done=training, log=worker.log)
    (pool_process,) = worker.children()
    db = Database(settings.database_url)
    with db.session() as session:
        runner = session.get(Job, job_id).runner
    db.dispose()
    assert runner.startswith(runner_place(worker.node, pool_process))  # where the main process looks at a hard limit
    os.kill(pool_process, signal.SIGKILL)
    return wait_for(client, job_id, headers, log=worker.log)


def test_a_job_whose_worker_process_dies_runs_again_and_counts_the_attempt(
    stack: TestClient, stack_settings: Settings, worker: ServiceProcess, digits_backdoor
) -> None:
    job = killed_mid_job(stack, stack_settings, worker, digits_backdoor)
    assert job["status"] == "succeeded" and job["attempts"] == 2


def test_with_make_up_s_brokerless_fallback_a_job_whose_worker_process_dies_runs_again(
    tmp_path: Path, digits_backdoor
) -> None:
    """`make up` where no Redis is installed: SQLite and kombu's SQLAlchemy transport, no server at all. The
    sweeper was off there, and the job stayed running for ever (the message given back finds it started)."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'nad.db'}",
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", storage_dir=tmp_path / "storage",
                        job_time_limit=600, sweep_interval=15)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            job = killed_mid_job(client, settings, worker, digits_backdoor)
    finally:
        worker.kill()
    assert job["status"] == "succeeded" and job["attempts"] == 2, job["error"]
    assert f"job {job['id']}: its worker stopped giving signs of life; queued it again" in worker.log.read_text()


def test_an_unusable_upload_fails_the_job_with_the_engines_reason(
    stack: TestClient, stack_settings: Settings, worker: ServiceProcess, digits_backdoor
) -> None:
    headers = new_key(stack_settings)
    files = upload(digits_backdoor) | {"model": ("model.pt", b"this is not a checkpoint")}
    response = stack.post(
        "/sanitize", headers=headers, files=files, data={"params": json.dumps(digits_backdoor.params)}
    )
    job = wait_for(stack, response.json()["id"], headers, timeout=120, log=worker.log)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "checkpoint" in job["error"] and job["error"] != INTERNAL_ERROR
    assert str(stack_settings.storage_dir) not in job["error"]


def test_a_job_past_the_time_limit_fails_saying_so(make_settings, digits_backdoor, tmp_path: Path) -> None:
    settings = make_settings(job_time_limit=10)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            headers = new_key(settings)
            job_id = submit(client, headers, digits_backdoor, **LONG)
            job = wait_for(client, job_id, headers, timeout=180, log=worker.log)
    finally:
        worker.kill()
    assert job["status"] == "failed" and "time limit of 10 s" in job["error"]


def test_a_run_deaf_to_the_soft_limit_is_killed_at_the_hard_one_and_the_worker_takes_the_next(
    make_settings, digits_backdoor, tmp_path: Path
) -> None:
    """A pool process that never answers the soft time limit (stopped here, as one stuck in a call that never
    returns would be) is killed at the hard limit, a minute later. The worker's main process fails the job for
    the run it kills, and the worker goes on with a new pool process. Other tests reach this path through
    Celery's own request with a stand-in message; this one through billiard's real timer and kill."""
    # A soft limit of 20 s leaves a loaded machine time to start training before it; the sweeper stays out.
    settings = make_settings(job_time_limit=20, sweep_interval=600)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings)) as client:
            headers = new_key(settings)
            stuck = submit(client, headers, digits_backdoor, **LONG)
            started = wait_for(client, stuck, headers, done=lambda job: training(job) or job["status"] in FINISHED,
                               log=worker.log)
            assert training(started), started
            (pool_process,) = worker.children()
            os.kill(pool_process, signal.SIGSTOP)
            job = wait_for(client, stuck, headers, timeout=180, log=worker.log)
            unusable = {"model": ("model.pt", b"this is not a checkpoint")}
            following = wait_for(client, submit(client, headers, digits_backdoor, unusable), headers, log=worker.log)
            killed = not Path(f"/proc/{pool_process}").exists()  # and reaped, by the worker
    finally:
        worker.kill()
    assert job["status"] == "failed" and "time limit of 20 s" in job["error"] and job["attempts"] == 1
    assert f"Hard time limit (80s) exceeded for nad.sanitize[{stuck}-0]" in worker.log.read_text() and killed
    assert written_by_the_worker(Storage(settings.storage_dir), stuck) == []
    assert following["status"] == "failed" and "checkpoint" in following["error"]


def test_restarting_the_api_while_a_job_runs_loses_nothing(
    stack_settings: Settings, worker: ServiceProcess, digits_backdoor, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "api.log"
    key = new_key(stack_settings)["Authorization"].removeprefix("Bearer ")
    api = start_api(stack_settings, port, log)
    client = Client(f"http://127.0.0.1:{port}", key)
    try:
        files = {
            "model": digits_backdoor.checkpoint,
            "clean_data": digits_backdoor.clean,
            "test_data": digits_backdoor.test,
        }
        job_id = client.submit(files, digits_backdoor.params | SHORT, show_progress=False)["id"]
        wait_for(client.http, job_id, {}, done=training, log=worker.log)
        api.kill()
        with pytest.raises(httpx.TransportError):
            client.http.get("/healthz")
        # The client asks all through the restart, as `nad submit` would: no answer is asked again.
        waited: list[dict] = []
        waiting = threading.Thread(target=lambda: waited.append(client.wait(job_id, interval=0.3,
                                                                             show_progress=False)), daemon=True)
        waiting.start()
        api = start_api(stack_settings, port, log)
        waiting.join(300)
        assert waited, "the client gave up while the API restarted"
        job = waited[0]
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert set(job["inputs"]) == {"model", "clean_data", "test_data"}
        saved = client.download(job_id, tmp_path / "cleansed.safetensors", show_progress=False)
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == job["output"]["sha256"]
        assert client.metrics(job_id)["after"]["asr"] is not None
        with pytest.raises(ServiceError, match="404 Not Found: .*job"):  # the problem's detail, not a crash
            client.download(new_job_id(), tmp_path / "none.safetensors", show_progress=False)
    finally:
        client.close()
        api.kill()


def test_nad_submit_runs_a_job_and_prints_the_before_after_table(
    stack_settings: Settings, worker: ServiceProcess, digits_backdoor, tmp_path: Path
) -> None:
    port = free_port()
    api = start_api(stack_settings, port, tmp_path / "api.log")
    key = new_key(stack_settings)["Authorization"].removeprefix("Bearer ")
    out = tmp_path / "cleansed.safetensors"
    env = os.environ | {"NAD_API_URL": f"http://127.0.0.1:{port}", "NAD_API_KEY": key}
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "core.cli",
                "submit",
                str(digits_backdoor.checkpoint),
                str(digits_backdoor.clean),
                "--test-data",
                str(digits_backdoor.test),
                "--params",
                json.dumps(digits_backdoor.params | SHORT),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        api.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    header = done.stdout.splitlines()[1].split()
    assert header == ["ACC", "ACC*", "ASR", "ASR0"]
    assert len(table["before"]) == len(table["after"]) == len(header)
    assert out.stat().st_size > 0 and f"cleansed checkpoint: {out}" in done.stdout


def start_uploading(port: int, headers: dict[str, str]) -> socket.socket:
    """POST /sanitize announcing a 64 MiB body, of which only the first MiB of the model is sent: the upload
    stays under way for as long as the connection is open."""
    boundary = "nad-test-boundary"
    request = (
        f"POST /sanitize HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {headers['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {64 << 20}\r\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="model.pt"\r\n\r\n'
    )
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(request.encode() + bytes(1 << 20))
    return connection


def received_part(incoming: Path, timeout: float = 30) -> Path:
    """The first upload file under `incoming` with bytes in it, once one has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [path for path in incoming.glob("*/*/inputs/model") if path.stat().st_size > 0]
        if found:
            return found[0]
        time.sleep(0.1)
    pytest.fail(f"no upload appeared under {incoming} within {timeout} s")


def test_an_api_killed_mid_upload_leaves_no_job_and_no_file(make_settings, tmp_path: Path) -> None:
    """The next API to start removes what the dead one was receiving, and only that: the upload this test
    process is receiving meanwhile (another live replica's, on the same storage) stays."""
    settings, port, log = make_settings(), free_port(), tmp_path / "api.log"
    incoming = settings.storage_dir / "incoming"
    api = start_api(settings, port, log)  # it migrates the database: a key can be made after it
    try:
        headers = new_key(settings)
        with start_uploading(port, headers):
            partial = received_part(incoming)
            api.kill()  # while the upload is under way: one the client breaks off is discarded by the API
    finally:
        api.kill()  # dead already, unless the upload never showed
    replica = Storage(settings.storage_dir).input_writer(new_job_id(), "model", limit=10)
    replica.write(b"1")
    api = start_api(settings, port, log)
    try:
        listed = httpx.get(f"http://127.0.0.1:{port}/jobs", headers=headers).json()
    finally:
        api.kill()
    assert listed["items"] == [] and not any((settings.storage_dir / "jobs").glob("*"))
    assert not partial.parents[2].exists(), "the dead API's folder is still there"
    left = sorted(path.name for path in incoming.rglob("*") if path.is_file())
    assert left == [LOCK_FILE, "model"] and replica.close().size == 1  # the live replica's upload


def hostile_inputs(folder: Path, marker: Path) -> dict[str, dict]:
    """Upload files built to hurt the worker, each by what the reason of its job's failure must say."""
    pickle = folder / "evil.pt"
    torch.save(Payload(marker), pickle)
    slip = _zip(folder / "clean.zip", {"0/ok.png": _png(), "../evil.png": _png(1)})
    lying = _safetensors(folder / "m.safetensors", {"w": _entry("U8", [2**40, 2**40], [0, 8])}, bytes(8))
    return {
        "can be read safely": {"model": ("evil.pt", pickle.read_bytes())},
        "archive member '../evil.png'": {"clean_data": ("clean.zip", slip.read_bytes())},
        "safetensors file is damaged": {"model": ("m.safetensors", lying.read_bytes())},
    }


def written_by_the_worker(storage: Storage, job_id: str) -> list[Path]:
    """The files in a job's folder besides its uploads (inputs/)."""
    folder = storage.job_dir(job_id)
    return [path for path in folder.rglob("*") if path.is_file() and path.relative_to(folder).parts[0] != "inputs"]


def test_hostile_uploads_fail_their_jobs_harmlessly_and_the_worker_takes_the_next(
    stack: TestClient, stack_settings: Settings, worker: ServiceProcess, digits_backdoor, tmp_path: Path
) -> None:
    headers, marker = new_key(stack_settings), tmp_path / "ran"
    failing = {reason: submit(stack, headers, digits_backdoor, files)
               for reason, files in hostile_inputs(tmp_path, marker).items()}
    good = submit(stack, headers, digits_backdoor, **SHORT)
    storage = Storage(stack_settings.storage_dir)
    for reason, job_id in failing.items():
        job = wait_for(stack, job_id, headers, timeout=120, log=worker.log)
        assert job["status"] == "failed" and reason in job["error"], job["error"]
        assert job["output"] is None and written_by_the_worker(storage, job_id) == []
    assert not marker.exists(), "the pickle's code ran"
    assert wait_for(stack, good, headers, log=worker.log)["status"] == "succeeded"
