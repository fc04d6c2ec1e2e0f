"""The whole service with real parts: a Celery worker process on Redis, PostgreSQL, the real engine, and the
API in-process or as a uvicorn process, sanitizing the real backdoored model of the `digits_backdoor` fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from service_fixtures import ROOT, ServiceProcess, free_port, new_key, start_api, start_worker, wait_for

from api.app import create_app
from core.client import Client
from core.engine.sanitize import evaluate_checkpoint
from core.jobs import INTERNAL_ERROR
from core.params import SanitizeParams
from core.settings import Settings
from core.storage import Storage

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


def submit(client: TestClient, headers: dict[str, str], case, **overrides) -> str:
    response = client.post(
        "/sanitize", headers=headers, files=upload(case), data={"params": json.dumps(case.params | overrides)}
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
    assert not Storage(stack_settings.storage_dir).output_path(job_id).exists()
    assert stack.get(f"/jobs/{job_id}/metrics", headers=headers).status_code == 409
    assert stack.delete(f"/jobs/{job_id}", headers=headers).status_code == 204


def test_a_job_whose_worker_process_dies_runs_again_and_counts_the_attempt(
    stack: TestClient, stack_settings: Settings, worker: ServiceProcess, digits_backdoor
) -> None:
    headers = new_key(stack_settings)
    job_id = submit(stack, headers, digits_backdoor, **SHORT)
    wait_for(stack, job_id, headers, done=training, log=worker.log)
    (pool_process,) = worker.children()
    os.kill(pool_process, signal.SIGKILL)  # as the kernel's OOM killer would
    job = wait_for(stack, job_id, headers, log=worker.log)
    assert job["status"] == "succeeded" and job["attempts"] == 2


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
        api = start_api(stack_settings, port, log)
        job = client.wait(job_id, interval=0.3, show_progress=False)
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert set(job["inputs"]) == {"model", "clean_data", "test_data"}
        saved = client.download(job_id, tmp_path / "cleansed.safetensors", show_progress=False)
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == job["output"]["sha256"]
        assert client.metrics(job_id)["after"]["asr"] is not None
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
    assert header[0] == "ACC" and header[-1] == "ASR"
    assert len(table["before"]) == len(table["after"]) == len(header)
    assert out.stat().st_size > 0 and f"cleansed checkpoint: {out}" in done.stdout
