"""The operator's limits and the storage's failures: the per-key cap on queued jobs (429), the caps on epochs
(422) and on a job's images (the worker fails the job), a full disk (507 in the API; a failed job and no
partial checkpoint in the worker), and files gone from storage."""

from __future__ import annotations

import errno
import hashlib
import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from service_fixtures import (
    PARAMS,
    StoodStill,
    committed_then_refused,
    new_key,
    problem,
    refused,
    submit,
    taken_back,
)
from sqlalchemy import select
from sqlalchemy.exc import DatabaseError

from api import uploads
from api.app import create_app
from core import jobs
from core.database import Database
from core.engine import data
from core.engine.data import TooManyImages, load_images
from core.engine.errors import Cancelled, InputError
from core.engine.events import Event
from core.settings import Settings
from core.storage import FileWriter, Storage, output_name
from worker.broker import make_celery
from worker.dispatch import broker_task_ids

pytest_plugins = ["service_fixtures"]


def leftovers(settings: Settings) -> list[Path]:
    """Uploads being received, and job folders without a job: a refused upload leaves neither."""
    db = Database(settings.database_url)
    with db.session() as session:
        known = set(session.scalars(select(jobs.Job.id)))
    db.dispose()
    root = settings.storage_dir
    return [*(root / "incoming").rglob("inputs/*"), *(p for p in (root / "jobs").glob("*") if p.name not in known)]


@pytest.fixture(scope="module")
def limited_settings(make_settings) -> Settings:
    return make_settings(max_queued_jobs=2, max_epochs=50)


@pytest.fixture(scope="module")
def limited(limited_settings: Settings) -> Iterator[TestClient]:
    """The API with low operator limits; each test takes a new key, so its queue starts empty."""
    with TestClient(create_app(limited_settings)) as client:
        yield client


@pytest.mark.parametrize("field", ["sweep_interval", "key_cache_seconds"])
def test_intervals_must_be_finite(field: str) -> None:
    """An infinite sweep interval failed every job's start (timedelta overflows) and left it queued for ever;
    an infinite key cache kept a revoked key working until the API restarted."""
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: float("inf")})


@pytest.mark.parametrize(("field", "value"), [("max_upload_bytes", 0), ("max_queued_jobs", 0), ("max_epochs", 0),
                                             ("max_images", 0), ("job_time_limit", 9), ("max_attempts", 0),
                                             ("sweep_interval", 0), ("api_workers", 65)])
def test_limits_out_of_their_range_are_refused(field: str, value: float) -> None:
    """A cap of 0 refuses or fails every job (a queue cap of 0 answers each upload 429) and a job started 0
    times is never run: a setting's mistake, said as one, not a service that takes no job."""
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


# ---- the per-key cap on queued jobs --------------------------------------------------------------------


def test_a_key_at_its_queue_cap_is_refused_429_before_its_body_is_read(
    limited: TestClient, limited_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = new_key(limited_settings)
    first, second = (submit(limited, headers).json()["id"] for _ in range(2))
    received = []
    monkeypatch.setattr(uploads, "receive", lambda *args: received.append(args))
    refused = limited.post("/sanitize", headers=headers, files={"model": ("m", b"m" * 100_000)})
    body = problem(refused, 429)
    assert "2 jobs queued or running" in body["detail"] and "cancel one" in body["detail"]
    assert int(refused.headers["retry-after"]) > 0
    assert received == []  # refused on a count query, before the upload was read
    monkeypatch.undo()
    assert leftovers(limited_settings) == []
    assert submit(limited, new_key(limited_settings)).status_code == 202  # the cap is per key

    db = Database(limited_settings.database_url)
    with db.session() as session:  # a running job still counts
        assert jobs.start_attempt(session, first, dispatch=0, runner="a run") is not None
    db.dispose()
    problem(submit(limited, headers), 429)
    assert limited.post(f"/jobs/{second}/cancel", headers=headers).status_code == 200
    assert submit(limited, headers).status_code == 202


def test_uploads_sent_at_once_do_not_pass_the_cap_together(
    limited: TestClient, limited_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each passed the count before its body was read, when none of the others was recorded yet (as if
    `_check_queue` ran for all of them first): counted again once recorded, the one past the cap is refused."""
    headers, broker = new_key(limited_settings), make_celery(limited_settings)
    monkeypatch.setattr("api.jobs._check_queue", lambda *args: None)
    sent_before = broker_task_ids(broker, limited_settings.queue)
    answers = [submit(limited, headers) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [202, 202, 429]
    assert "2 jobs queued or running" in problem(answers[2], 429)["detail"]
    kept = [job["id"] for job in limited.get("/jobs", headers=headers).json()["items"]]
    assert len(kept) == 2 and leftovers(limited_settings) == []
    # the one refused was never sent: a worker would have been given a job withdrawn under it
    assert broker_task_ids(broker, limited_settings.queue) - sent_before == {f"{job_id}-0" for job_id in kept}


def test_a_retried_submission_at_the_cap_gets_its_job_back(
    limited: TestClient, limited_settings: Settings
) -> None:
    headers = new_key(limited_settings)
    first = submit(limited, headers, **{"Idempotency-Key": "retry-1"}).json()["id"]
    submit(limited, headers)
    again = submit(limited, headers, **{"Idempotency-Key": "retry-1"})
    assert again.status_code == 202 and again.json()["id"] == first
    problem(submit(limited, headers, **{"Idempotency-Key": "retry-2"}), 429)


# ---- the cap on epochs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        ({"epochs": 51}, ["params.epochs"]),
        ({"teacher_epochs": 51}, ["params.teacher_epochs"]),
        ({"epochs": 60, "teacher_epochs": 70}, ["params.epochs", "params.teacher_epochs"]),
        ({"method": "fst", "fst_epochs": 51}, ["params.fst_epochs"]),
        ({"method": "ibau", "ibau_rounds": 51}, ["params.ibau_rounds"]),
        ({"method": "sau", "sau_epochs": 51}, ["params.sau_epochs"]),
        # with another field wrong too, both are named at once: fixing one would only have shown the other
        ({"epochs": 51, "bogus": 1}, ["params.bogus", "params.epochs"]),
        ({"epochs": 51, "teacher_epochs": 0}, ["params.teacher_epochs", "params.epochs"]),
    ],
)
def test_epochs_past_the_operators_cap_are_422_naming_the_field(
    limited: TestClient, limited_settings: Settings, extra: dict, fields: list[str]
) -> None:
    headers = new_key(limited_settings)
    body = problem(submit(limited, headers, params=PARAMS | extra), 422)
    assert [error["field"] for error in body["errors"]] == fields
    assert body["detail"].startswith(fields[0]) and "is more than this service's limit of 50 epochs" in body["detail"]
    assert leftovers(limited_settings) == []
    at_the_cap = submit(limited, headers, params=PARAMS | {"epochs": 50, "teacher_epochs": 50})
    assert at_the_cap.status_code == 202


def test_an_epoch_count_past_the_schemas_limit_and_the_operators_cap_is_named_once(
    limited: TestClient, limited_settings: Settings
) -> None:
    """The schema's refusal and the operator's cap are listed together, each field once: epochs past both
    limits is one error to fix, not two that contradict each other on the maximum."""
    body = problem(submit(limited, new_key(limited_settings), params=PARAMS | {"epochs": 5000}), 422)
    assert [error["field"] for error in body["errors"]] == ["params.epochs"]
    assert leftovers(limited_settings) == []


# ---- parameters that contradict each other --------------------------------------------------------------


@pytest.mark.parametrize(("extra", "said"), [
    ({"mean": [0.5, 0.5, 0.5]}, "give both mean and std, or neither"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}, "std must be positive"),  # it divides
    ({"classes": ["a", "b"]}, "classes lists 2 names but num_classes is 10"),
    ({"layers": ["block1"], "betas": [1.0, 2.0]}, "2 betas for 1 layers: give one beta per layer"),
    ({"target_label": 10}, "target_label 10 is not below num_classes 10"),  # its ASR would read 0, not wrong
    ({"trigger": {"type": "badnets", "pattern": [[255]], "position": [0, 0]}}, "a trigger needs target_label"),
])
def test_parameters_that_contradict_each_other_are_refused(extra: dict, said: str) -> None:
    from core.params import SanitizeParams

    with pytest.raises(ValidationError, match=said):
        SanitizeParams(arch="wrn-16-1", num_classes=10, **extra)


# ---- a full disk and a vanished file in the API -----------------------------------------------------------


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every upload's bytes go to /dev/full, which fails each write (or the flush of buffered bytes) with
    ENOSPC, as a full volume does; the file itself is still created where the real one would be."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    opened = FileWriter.__init__

    def init(self: FileWriter, folder: Path, relative: str, limit: int) -> None:
        opened(self, folder, relative, limit)
        self._stream.close()
        self._stream = open("/dev/full", "wb")  # noqa: SIM115 - closed by the writer, as its own stream is

    monkeypatch.setattr(FileWriter, "__init__", init)


def _over_quota(self: FileWriter, chunk: bytes) -> None:
    raise OSError(errno.EDQUOT, "Disk quota exceeded")


@pytest.mark.parametrize("fault", ["at-close", "at-write", "quota"])
def test_a_full_disk_while_receiving_an_upload_is_507_and_leaves_nothing(
    api: TestClient, api_settings: Settings, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A small file fails as it is closed, a larger one as it is written; the service's quota on the volume
    spent is a full disk to it."""
    content = b"m" * 200_000 if fault == "at-write" else b"small, so the failure comes as the file is closed"
    if fault == "quota":
        monkeypatch.setattr(FileWriter, "write", _over_quota)
    else:
        _full_disk(monkeypatch)
    response = submit(api, auth, files={"model": ("model.pt", content), "clean_data": ("c.zip", b"c")})
    assert "disk space" in problem(response, 507)["detail"]
    assert "No space left" not in response.text
    monkeypatch.undo()
    assert api.get("/jobs", headers=auth).json()["items"] == []
    assert leftovers(api_settings) == []


def test_an_upload_becomes_a_job_folder_only_once_its_job_is_recorded(
    api: TestClient, api_settings: Settings, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API killed while it records the job (a slow database, say) leaves the upload in its incoming/ folder,
    which the next API to start removes. Moved into jobs/ first, it stayed there for good with no job (the
    chaos hunt, with `kill -9`). What a process killed there leaves is what storage holds as the record begins."""
    create_job, during = jobs.create_job, []

    def recording(*args, **kwargs) -> jobs.Job:
        during.append(leftovers(api_settings))
        return create_job(*args, **kwargs)

    monkeypatch.setattr(jobs, "create_job", recording)
    assert submit(api, auth).status_code == 202
    (uploads_then,) = during
    assert uploads_then and all("incoming" in path.parts for path in uploads_then)
    assert leftovers(api_settings) == []  # and once recorded, it is in place


def test_a_retry_after_a_record_whose_answer_was_lost_brings_the_files_the_job_lacks(
    api: TestClient, api_settings: Settings, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database commits the job and the connection drops before it says so: the API answers 503 and
    discards the upload, and the job is recorded without its files. The client's retry under the same
    Idempotency-Key got that job back, to fail at the worker for its missing files (found by the review);
    its upload now takes their place, and the job is sent."""
    create_job = jobs.create_job
    monkeypatch.setattr(jobs, "create_job", committed_then_refused(create_job, api_settings.database_url))
    problem(submit(api, auth, **{"Idempotency-Key": "lost-answer"}), 503)
    again = submit(api, auth, **{"Idempotency-Key": "lost-answer"})
    assert again.status_code == 202
    job_id = again.json()["id"]
    storage = Storage(api_settings.storage_dir)
    assert storage.path(job_id, "inputs/model").read_bytes() == b"checkpoint bytes"
    assert f"{job_id}-0" in broker_task_ids(make_celery(api_settings), api_settings.queue)
    assert leftovers(api_settings) == []

    # Its owner cancelled the job, seen queued in the list, before retrying: the retry gets the cancelled job
    # back, and its upload is discarded, neither kept for a job that will never run nor sent to the workers.
    monkeypatch.setattr(jobs, "create_job", committed_then_refused(create_job, api_settings.database_url))
    problem(submit(api, auth, **{"Idempotency-Key": "cancelled-meanwhile"}), 503)
    (cancelled,) = api.get("/jobs", headers=auth, params={"limit": 1}).json()["items"]
    assert api.post(f"/jobs/{cancelled['id']}/cancel", headers=auth).status_code == 200
    again = submit(api, auth, **{"Idempotency-Key": "cancelled-meanwhile"})
    assert (again.status_code, again.json()["id"], again.json()["status"]) == (202, cancelled["id"], "cancelled")
    assert not storage.job_dir(cancelled["id"]).exists() and leftovers(api_settings) == []
    assert f"{cancelled['id']}-0" not in broker_task_ids(make_celery(api_settings), api_settings.queue)

    # The first's API, alive, withdraws its job just after the retry looked (its broker refused, say): the
    # retry's copy went to a folder of no job, for good, and its 202 named a job that was gone (the review).
    monkeypatch.setattr(jobs, "create_job", committed_then_refused(create_job, api_settings.database_url))
    find, found = jobs.find_by_idempotency_key, []

    def then_withdrawn(session, *args) -> jobs.Job | None:
        first = find(session, *args)
        found.extend([first] if first else [])
        if len(found) == 2:  # the retry's second look, the one that stands in (its first checks the queue)
            own = Database(api_settings.database_url)
            with own.session() as elsewhere:
                jobs.withdraw(elsewhere, first.id)
            own.dispose()
        return first

    monkeypatch.setattr(jobs, "find_by_idempotency_key", then_withdrawn)
    problem(submit(api, auth, **{"Idempotency-Key": "withdrawn"}), 503)
    assert "send it again" in problem(submit(api, auth, **{"Idempotency-Key": "withdrawn"}), 503)["detail"]
    assert leftovers(api_settings) == []
    monkeypatch.setattr(jobs, "find_by_idempotency_key", find)
    assert submit(api, auth, **{"Idempotency-Key": "withdrawn"}).status_code == 202  # the key is free again
    # withdrawn between the retry's record, refused as a duplicate, and its look for the first: a 500 before
    monkeypatch.setattr(jobs, "find_by_idempotency_key", lambda *args: None)
    problem(submit(api, auth, **{"Idempotency-Key": "withdrawn"}), 503)
    assert leftovers(api_settings) == []


def test_an_upload_aborted_on_a_full_disk_keeps_the_error_that_stopped_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes buffered before the failing write cannot be flushed either: closing must not raise that again
    over the first error (the API would answer 500 instead of 507)."""
    _full_disk(monkeypatch)
    writer = FileWriter(tmp_path, "inputs/model", 1 << 30)
    writer.write(b"a little")
    with pytest.raises(OSError) as raised:
        writer.write(b"m" * 200_000)
    assert raised.value.errno == errno.ENOSPC
    writer.abort()


def test_a_succeeded_job_whose_checkpoint_vanished_answers_a_500_problem(
    api: TestClient, api_settings: Settings, auth: dict[str, str]
) -> None:
    job_id = submit(api, auth).json()["id"]
    checkpoint = b"cleansed"
    record = jobs.FileRecord(jobs.OUTPUT, "output/0/model.safetensors", len(checkpoint),
                             hashlib.sha256(checkpoint).hexdigest())
    db = Database(api_settings.database_url)
    with db.session() as session:
        jobs.start_attempt(session, job_id, dispatch=0, runner="a run")
        assert jobs.succeed(session, job_id, 0, {"after": {}}, record)
    db.dispose()
    assert not Storage(api_settings.storage_dir).path(job_id, record.path).exists()
    body = problem(api.get(f"/jobs/{job_id}/model", headers=auth), 500)
    assert job_id in body["detail"] and "missing" in body["detail"] and "operators" in body["detail"]


def test_the_openapi_description_documents_the_new_answers(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    assert {"429", "507"} <= set(paths["/sanitize"]["post"]["responses"])
    assert "500" in paths["/jobs/{job_id}/model"]["get"]["responses"]
    # a queued job cancelled at once is answered 200 with the job, as a running one's 202 is
    cancelled = paths["/jobs/{job_id}/cancel"]["post"]["responses"]["200"]["content"]["application/json"]
    assert cancelled["schema"] == {"$ref": "#/components/schemas/JobResource"}


# ---- the cap on a job's images, in the engine -------------------------------------------------------------


def _png(shade: int) -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(stream, format="PNG")
    return stream.getvalue()


def _zip(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"{'ab'[i % 2]}/{i}.png", _png(i))
    return path


def _tar(path: Path, count: int) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for i in range(count):
            content = _png(i)
            member = tarfile.TarInfo(f"{'ab'[i % 2]}/{i}.png")
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return path


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
def test_a_folder_archive_past_the_image_cap_stops_at_the_first_image_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make
) -> None:
    path = make(tmp_path / "data", 10)
    decoded = []
    decode = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda content, name: decoded.append(name) or decode(content, name))
    with pytest.raises(TooManyImages) as raised:
        load_images(path, 8, max_images=3)
    assert raised.value.count is None and raised.value.limit == 3 and len(decoded) == 3
    assert "more than 3 images" in str(raised.value)
    assert len(load_images(path, 8, max_images=10).labels) == 10


def test_an_npz_past_the_image_cap_is_refused_from_its_header(tmp_path: Path) -> None:
    """The header's count is enough: this x's data is cut short, and reading it would fail otherwise."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1000, 8, 8, 3)})
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
        labels = io.BytesIO()
        np.save(labels, np.zeros(1000, dtype=np.int64))
        archive.writestr("y.npy", labels.getvalue())
    with pytest.raises(TooManyImages) as raised:
        load_images(path, 8, max_images=999)
    assert raised.value.count == 1000 and "1,000 images" in str(raised.value)
    with pytest.raises(InputError, match="could not be read"):
        load_images(path, 8, max_images=1000)


def _npz(path: Path, count: int) -> Path:
    rng = np.random.default_rng(count)
    np.savez(path, x=rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8), y=np.arange(count) % 2)
    return path


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """An untrained two-class model: enough for a job that stops while loading its images."""
    from core.engine.checkpoints import write_checkpoint
    from core.engine.models import build_model

    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    write_checkpoint(build_model("wrn-16-1", 2), path, {"arch": "wrn-16-1"})
    return path


@pytest.mark.parametrize(
    ("limit", "refusal"),
    [
        (20, "clean_data holds 30 images, more than this service's limit of 20 images per job"),
        (50, "test_data holds 30 images, which with the 30 of clean_data is more than this service's limit of 50"),
        (70, "poison_data holds 30 images, which with the 30 of clean_data and the 30 of test_data is more than "
             "this service's limit of 70"),
    ],
)
def test_sanitize_fails_a_job_whose_archives_pass_the_image_cap_naming_the_archive(
    small_checkpoint: Path, tmp_path: Path, limit: int, refusal: str
) -> None:
    from core.engine.sanitize import JobFiles, sanitize
    from core.params import SanitizeParams

    files = JobFiles(checkpoint=small_checkpoint, clean_data=_npz(tmp_path / "clean.npz", 30),
                     test_data=_npz(tmp_path / "test.npz", 30), poison_data=_npz(tmp_path / "poison.npz", 30),
                     out=tmp_path / "out" / "model.safetensors")
    params = SanitizeParams(arch="wrn-16-1", num_classes=2, input_size=16, target_label=0)
    with pytest.raises(InputError) as raised:
        sanitize(files, params, max_images=limit)
    assert str(raised.value).startswith(refusal) and "nad subset" in str(raised.value)
    assert not files.out.exists()


def test_a_refused_archive_is_named_by_its_role(small_checkpoint: Path, tmp_path: Path) -> None:
    """A job has up to three archives, and may have a teacher: the message says which one is wrong."""
    from core.engine.checkpoints import write_checkpoint
    from core.engine.models import build_model
    from core.engine.sanitize import JobFiles, evaluate_checkpoint, sanitize
    from core.params import SanitizeParams

    unreadable = tmp_path / "test.npz"
    unreadable.write_bytes(b"no archive at all")
    files = JobFiles(checkpoint=small_checkpoint, clean_data=_npz(tmp_path / "clean.npz", 30), test_data=unreadable,
                     out=tmp_path / "out" / "model.safetensors")
    params = SanitizeParams(arch="wrn-16-1", num_classes=2, input_size=16)
    with pytest.raises(InputError, match="^test_data: the data file is not in a format we read"):
        sanitize(files, params)
    with pytest.raises(InputError, match="^test_data: the data file is not in a format we read"):  # nad evaluate
        evaluate_checkpoint(small_checkpoint, unreadable, params)
    # A teacher that does not fit is the teacher's fault, not the suspect's ("the checkpoint" alone).
    three = tmp_path / "three-classes.safetensors"
    write_checkpoint(build_model("wrn-16-1", 3), three, {"arch": "wrn-16-1"})
    with pytest.raises(InputError, match="^teacher: the checkpoint does not fit wrn-16-1 with this class count"):
        sanitize(replace(files, test_data=None, teacher=three), params)


def test_clean_data_that_leaves_classes_out_is_warned_of(small_checkpoint: Path, tmp_path: Path) -> None:
    """An npz's labels may leave classes out, and so may folders where `classes` names every class: a model
    fine-tuned without a class's images may forget it, and the job said nothing."""
    from core.engine.sanitize import JobFiles, sanitize
    from core.params import SanitizeParams

    clean = tmp_path / "clean.npz"
    np.savez(clean, x=np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y=np.zeros(40, int))
    files = JobFiles(checkpoint=small_checkpoint, clean_data=clean, out=tmp_path / "out.safetensors")
    report = sanitize(files, SanitizeParams(arch="wrn-16-1", num_classes=2, input_size=16, method="finetune",
                                            teacher_epochs=1))
    said = "clean_data holds no image of 1 of the model's 2 classes (1): the model was fine-tuned without them"
    assert [warning[:len(said)] for warning in report["warnings"]] == [said]
    folders = tmp_path / "clean.zip"
    with zipfile.ZipFile(folders, "w") as archive:
        for index in range(20):
            image = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), index, np.uint8)).save(image, format="PNG")
            archive.writestr(f"cat/{index}.png", image.getvalue())
    report = sanitize(replace(files, clean_data=folders), SanitizeParams(
        arch="wrn-16-1", num_classes=2, classes=["cat", "dog"], input_size=16, method="finetune", teacher_epochs=1))
    assert [warning[:75] for warning in report["warnings"]] == [said.replace("(1)", "(dog)")[:75]]


def test_layers_that_give_no_feature_map_are_refused_before_any_training(small_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    from core.engine.sanitize import JobFiles, sanitize
    from core.params import SanitizeParams

    files = JobFiles(checkpoint=small_checkpoint, clean_data=_npz(tmp_path / "clean.npz", 30),
                     out=tmp_path / "out" / "model.safetensors")
    events = []
    params = SanitizeParams(arch="wrn-16-1", num_classes=2, input_size=16, method="nad", layers=["fc"], betas=[1])
    with pytest.raises(InputError, match="^'fc' gives no feature map"):
        sanitize(files, params, on_event=events.append)
    assert [event.stage for event in events] == ["load"] and not files.out.exists()


# ---- the worker: failures leave no checkpoint, and say what happened ------------------------------------


@dataclass
class WorkerJob:
    """A job recorded in a SQLite database as the API records one, for the task to run in this process."""

    settings: Settings
    db: Database
    storage: Storage
    id: str

    def row(self) -> jobs.Job:
        with self.db.session() as session:
            job = session.get(jobs.Job, self.id)
            session.expunge(job)
            return job


@pytest.fixture
def worker_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerJob]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'nad.db'}", storage_dir=tmp_path / "storage",
                        max_images=1234)
    with _recorded_job(settings, monkeypatch) as job:
        yield job


@contextmanager
def _recorded_job(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerJob]:
    """A job recorded in the settings' database, its two inputs stored, the task's settings these."""
    import worker.tasks

    db = Database(settings.database_url)
    db.migrate()
    storage, job_id = Storage(settings.storage_dir), jobs.new_job_id()
    inputs = []
    for role in ("model", "clean_data"):
        path = storage.path(job_id, f"inputs/{role}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(role.encode())
        inputs.append(jobs.FileRecord(role, f"inputs/{role}", len(role), hashlib.sha256(role.encode()).hexdigest()))
    with db.session() as session:
        jobs.create_job(session, job_id, "owner", "nad", PARAMS, inputs)
    monkeypatch.setattr(worker.tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(worker.tasks, "database", lambda: db)
    yield WorkerJob(settings, db, storage, job_id)
    db.dispose()


def _engine(monkeypatch: pytest.MonkeyPatch, error: BaseException | None, calls: list | None = None) -> None:
    """Stand in for the engine: it writes part of the checkpoint, then raises `error` (or writes it whole)."""
    import worker.tasks

    def sanitize(files, params, on_event, should_stop, **kwargs) -> dict:
        if calls is not None:
            calls.append(kwargs)
        files.out.parent.mkdir(parents=True, exist_ok=True)
        files.out.write_bytes(b"half a checkpoint")
        if error is not None:
            raise error  # noqa: B904 (implicit chaining, as the database driver raised it)
        return {"after": {}}

    monkeypatch.setattr(worker.tasks, "sanitize", sanitize)


def _run(job: WorkerJob) -> None:
    from worker.tasks import sanitize_job

    sanitize_job(job.id, 0)


def _outputs(job: WorkerJob) -> list[Path]:
    return [path for path in job.storage.job_dir(job.id).rglob("*") if path.is_file() and "inputs" not in path.parts]


def _raised_while_handling(cause: BaseException, error: Exception) -> Exception:
    """`error` chained to `cause` as Python chains an error raised inside an `except` for `cause`."""
    try:
        try:
            raise cause
        except BaseException:
            raise error  # noqa: B904 (implicit chaining, as the database driver raised it)
    except Exception as chained:
        return chained


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (SoftTimeLimitExceeded(), "the job ran past the service's time limit"),
        # The soft limit's signal landed inside a database call, whose driver failed on its half-sent query.
        (_raised_while_handling(SoftTimeLimitExceeded(), RuntimeError("can't change 'autocommit' now")),
         "the job ran past the service's time limit"),
        (OSError(errno.ENOSPC, "No space left on device", "/srv/nad/jobs/x/output/0/model.safetensors"),
         "the service ran out of disk space while running this job; submit it again later"),
        (RuntimeError("a bug"), jobs.INTERNAL_ERROR),
    ],
    ids=["time-limit", "time-limit-in-a-database-call", "disk-full", "bug"],
)
def test_a_failed_job_leaves_no_partial_checkpoint_and_says_why(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    _engine(monkeypatch, error)
    _run(worker_job)
    job = worker_job.row()
    assert job.status == jobs.Status.FAILED and job.error.startswith(reason) and "/srv" not in job.error
    assert _outputs(worker_job) == []


def test_a_cancel_after_the_last_epoch_ends_the_job_cancelled_without_its_checkpoint(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner cancels while the engine writes its checkpoint: the job ends cancelled, as asked, and the file
    it would have served is removed, not left in storage with no job to name it."""
    import worker.tasks

    def sanitize(files, params, on_event, should_stop, **kwargs) -> dict:
        files.out.parent.mkdir(parents=True, exist_ok=True)
        files.out.write_bytes(b"a whole checkpoint")
        with worker_job.db.session() as session:
            jobs.request_cancel(session, jobs.get_job(session, worker_job.id, "owner"))
        return {"after": {}}

    monkeypatch.setattr(worker.tasks, "sanitize", sanitize)
    _run(worker_job)
    job = worker_job.row()
    assert job.status == jobs.Status.CANCELLED and job.artifact(jobs.OUTPUT) is None
    assert _outputs(worker_job) == []


def test_a_database_outage_mid_job_costs_progress_writes_not_the_run(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database restart while a job trains: its progress writes and stop checks fail and the run goes on
    (the next epoch asks again); its last write, the result, is tried again until the database is back.
    Before, the first refused write ended the run, and its failure could not be recorded either."""
    import worker.tasks

    asked = []

    def sanitize(files, params, on_event, should_stop, **kwargs) -> dict:
        with monkeypatch.context() as outage:
            outage.setattr(jobs, "record_progress", refused)
            outage.setattr(jobs, "stop_requested", refused)
            on_event(Event("student", 0.5, epoch=1, epochs=2))
            asked.append(should_stop())
        files.out.parent.mkdir(parents=True, exist_ok=True)
        files.out.write_bytes(b"a checkpoint")
        return {"after": {}}

    refusals, succeed = iter([True, True]), jobs.succeed

    def back_on_the_third_try(*args, **kwargs) -> bool:
        if next(refusals, False):
            refused()
        return succeed(*args, **kwargs)

    monkeypatch.setattr(worker.tasks, "sanitize", sanitize)
    monkeypatch.setattr(worker.tasks, "FINAL_WRITE_PAUSE", 0.0)
    monkeypatch.setattr(jobs, "succeed", back_on_the_third_try)
    _run(worker_job)
    assert asked == [False]
    assert worker_job.row().status == jobs.Status.SUCCEEDED and len(_outputs(worker_job)) == 1


def test_a_database_out_for_minutes_as_a_job_ends_keeps_its_result(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch, worker_clock: StoodStill
) -> None:
    """The chaos hunt's outage of 17 s while a trained job's result was written failed the job and removed its
    checkpoint: the write was tried for 15 s. Now for FINAL_WRITE_PATIENCE, on a clock whose sleeps take no
    time here: the database answers again after five minutes."""
    succeed = jobs.succeed

    def back_after_five_minutes(*args, **kwargs) -> bool:
        if worker_clock.now < 300:
            refused()
        return succeed(*args, **kwargs)

    _engine(monkeypatch, None)
    monkeypatch.setattr(jobs, "succeed", back_after_five_minutes)
    _run(worker_job)
    assert worker_job.row().status == jobs.Status.SUCCEEDED and len(_outputs(worker_job)) == 1


def test_what_escapes_a_run_fails_its_job(worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch) -> None:
    """What escapes the task once its run has started the job (here the heartbeat's thread, which the system
    would not start) is Celery's failure, handled in the run's own process: the job is failed, as this run's,
    rather than left running until the sweeper takes it."""
    import worker.tasks
    from worker.tasks import sanitize_job

    @contextmanager
    def no_thread(*args) -> Iterator[None]:
        raise RuntimeError("can't start new thread")
        yield

    monkeypatch.setattr(worker.tasks, "heartbeat", no_thread)
    result = sanitize_job.apply(args=(worker_job.id, 0))  # Celery's own handling of what the task raises
    job = worker_job.row()
    assert result.state == "FAILURE" and (job.status, job.error) == (jobs.Status.FAILED, jobs.INTERNAL_ERROR)


@pytest.mark.parametrize(("error", "write", "ends"), [(None, "succeed", "succeeded"),
                                                      (Cancelled("cancelled"), "finish_cancelled", "cancelled"),
                                                      (InputError("bad"), "fail", "failed")])
def test_the_job_beats_while_its_last_word_is_written(worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch,
                                                     error: Exception | None, write: str, ends: str) -> None:
    """Its result, cancel or failure may be tried for minutes while the database is out: a silent job would
    be taken from its worker by the sweeper meanwhile, and run again."""
    import worker.tasks

    beating, seen, intervals = [], [], []

    @contextmanager
    def heartbeat(db, job_id, dispatch, interval):
        intervals.append(interval)
        beating.append(True)
        try:
            yield
        finally:
            beating.pop()

    written = getattr(jobs, write)

    def recording(*args, **kwargs) -> object:
        seen.append(bool(beating))
        return written(*args, **kwargs)

    _engine(monkeypatch, error)
    monkeypatch.setattr(worker.tasks, "heartbeat", heartbeat)
    monkeypatch.setattr(jobs, write, recording)
    _run(worker_job)
    assert seen == [True] and worker_job.row().status == ends
    # a quarter of the sweeper's interval: a live job beats several times between two of its rounds
    assert intervals == [worker_job.settings.sweep_interval / 4]


def test_a_result_recorded_by_a_write_whose_answer_was_lost_keeps_its_checkpoint(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database commits the result and the connection drops before it says so: the write is tried again,
    finds the job succeeded already, and took it for one cancelled meanwhile, removing the checkpoint that the
    job had recorded (found by the review of the longer retries)."""
    import worker.tasks

    cancelled = []
    _engine(monkeypatch, None)
    monkeypatch.setattr(worker.tasks, "FINAL_WRITE_PAUSE", 0.0)
    monkeypatch.setattr(jobs, "succeed", committed_then_refused(jobs.succeed, worker_job.settings.database_url))
    monkeypatch.setattr(jobs, "finish_cancelled", lambda *args: cancelled.append(args))
    _run(worker_job)
    job = worker_job.row()
    assert job.status == jobs.Status.SUCCEEDED and job.artifact(jobs.OUTPUT) is not None
    assert len(_outputs(worker_job)) == 1 and cancelled == []  # taken for its own success, not for a cancel


def test_a_start_whose_answer_was_lost_runs_the_job_on_its_first_attempt(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database commits the start and the connection drops before it says so: the start is tried again,
    and found the job running. It took the start for a copy's and ran nothing, so the job sat running with no
    run until the sweeper took it back, an attempt spent (left by 2026-12-06's fifth session's review)."""
    _engine(monkeypatch, None)
    start = committed_then_refused(jobs.start_attempt, worker_job.settings.database_url)
    monkeypatch.setattr(jobs, "start_attempt", start)
    _run(worker_job)
    job = worker_job.row()
    assert (job.status, job.attempts) == (jobs.Status.SUCCEEDED, 1) and len(_outputs(worker_job)) == 1


# The worker and the pool process of the runs these tests stop at the hard time limit
NODE, POOL_PROCESS = "celery@a-worker", 4321


def _started_by(job: WorkerJob, node: str, pid: int, dispatch: int = 0) -> None:
    """The job's message of sending `dispatch` started in pool process `pid` of worker `node`."""
    with job.db.session() as session:
        assert jobs.start_attempt(session, job.id, dispatch, jobs.runner_token(node, pid)) is not None


def _hard_limit(job: WorkerJob, dispatch: int = 0, node: str = NODE, pid: int = POOL_PROCESS) -> None:
    """What the worker's main process does at the hard time limit of the run of sending `dispatch` in pool
    process `pid` of worker `node`, before it kills that process: Celery's own request (the task's, with its
    message a stand-in from Celery's testing mocks) is told that the run timed out."""
    request = _running_request(job, dispatch, node, pid)
    request.on_timeout(soft=False, timeout=660)
    assert request.acknowledged  # the message is done with, whatever became of the job


def _running_request(job: WorkerJob, dispatch: int = 0, node: str = NODE, pid: int = POOL_PROCESS) -> Request:
    """Celery's request of the job's message of sending `dispatch`, as the worker's main process holds it while
    pool process `pid` of worker `node` runs it."""
    from celery.contrib.testing.mocks import TaskMessage

    from worker.tasks import sanitize_job

    message = TaskMessage(sanitize_job.name, args=(job.id, dispatch))
    request = sanitize_job.Request(message, app=sanitize_job.app, task=sanitize_job, hostname=node)
    request.on_accepted(pid, time.monotonic())
    return request


def test_a_job_killed_at_the_hard_time_limit_leaves_no_partial_checkpoint(worker_job: WorkerJob) -> None:
    _started_by(worker_job, NODE, POOL_PROCESS)
    partial = worker_job.storage.output_path(worker_job.id, 0)
    partial.parent.mkdir(parents=True)
    partial.with_name(".tmpX7q2").write_bytes(b"half a checkpoint")  # safetensors' file before its rename
    _hard_limit(worker_job)
    job = worker_job.row()
    assert job.status == jobs.Status.FAILED and "time limit" in job.error and _outputs(worker_job) == []


@pytest.mark.parametrize(("node", "pid"), [(NODE, 1234), ("celery@another-worker", POOL_PROCESS)],
                         ids=["another-pool-process", "another-worker"])
def test_a_copy_killed_at_the_hard_time_limit_leaves_the_live_run_alone(
    worker_job: WorkerJob, node: str, pid: int
) -> None:
    """A copy of a live run's message (a broker restored it) whose start hung on a stalled database server
    until the hard time limit: knowing only the sending, the worker's main process used to fail the live run's
    job and remove the checkpoint it was writing. The run lives in another pool process, or another worker."""
    _started_by(worker_job, node, pid)
    being_written = _written(worker_job, 0)
    _hard_limit(worker_job)
    job = worker_job.row()
    assert (job.status, job.error) == (jobs.Status.RUNNING, None) and _outputs(worker_job) == [being_written]


def test_a_failure_that_escapes_a_copy_leaves_the_live_run_alone(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy's start meets an error of the database that is no outage (not tried again): it escapes the task,
    and Celery's failure handler runs in the copy's process, which never started the job another run holds."""
    from worker.tasks import sanitize_job

    def broken(*args, **kwargs) -> None:
        raise DatabaseError("SELECT jobs ...", {}, Exception("database disk image is malformed"))

    _started_by(worker_job, NODE, POOL_PROCESS)
    being_written = _written(worker_job, 0)
    monkeypatch.setattr(jobs, "start_attempt", broken)
    result = sanitize_job.apply(args=(worker_job.id, 0))  # Celery's own handling of what the task raises
    assert result.state == "FAILURE"
    assert worker_job.row().status == jobs.Status.RUNNING and _outputs(worker_job) == [being_written]


def test_a_late_failure_report_keeps_the_checkpoint_the_job_recorded(worker_job: WorkerJob) -> None:
    """The hard limit reached just after the run recorded its result."""
    _started_by(worker_job, NODE, POOL_PROCESS)
    recorded = _written(worker_job, 0)
    output = jobs.FileRecord(jobs.OUTPUT, output_name(0), recorded.stat().st_size, "c" * 64)
    with worker_job.db.session() as session:
        assert jobs.succeed(session, worker_job.id, 0, {"after": {}}, output)
    _hard_limit(worker_job)
    assert worker_job.row().status == jobs.Status.SUCCEEDED and _outputs(worker_job) == [recorded]


def test_the_soft_time_limit_is_the_runs_to_report_not_the_main_processs(worker_job: WorkerJob) -> None:
    """At the soft limit Celery tells the run (SoftTimeLimitExceeded in its own process), which ends the job as
    it stands: its result being recorded, a cancel, or the time limit. The main process writes no failure then
    and removes nothing: it would overtake the run's own end, and take the checkpoint from under it."""
    _started_by(worker_job, NODE, POOL_PROCESS)
    being_written = _written(worker_job, 0)
    _running_request(worker_job).on_timeout(soft=True, timeout=600)
    job = worker_job.row()
    assert (job.status, job.error) == (jobs.Status.RUNNING, None) and _outputs(worker_job) == [being_written]


@pytest.mark.parametrize("ended", [jobs.Status.FAILED, jobs.Status.CANCELLED])
def test_a_copy_killed_at_the_hard_time_limit_after_the_job_ended_elsewhere_removes_what_was_left(
    worker_job: WorkerJob, ended: jobs.Status
) -> None:
    """The live run, in another worker, ended the job while a copy's start waited on a stalled server; a file of
    that sending written after the run's end removed its folder (its process killed as it wrote) is no run's
    now. The copy's hard limit, which ends nothing, removes it as the job's own end would have."""
    _started_by(worker_job, "celery@another-worker", POOL_PROCESS)
    with worker_job.db.session() as session:
        if ended == jobs.Status.FAILED:
            jobs.fail(session, worker_job.id, 0, "the live run's own failure")
        else:
            jobs.finish_cancelled(session, worker_job.id, 0)
    _written(worker_job, 0)
    _hard_limit(worker_job)
    job = worker_job.row()
    assert job.status == ended and _outputs(worker_job) == []
    assert job.error == ("the live run's own failure" if ended == jobs.Status.FAILED else None)


def test_a_cold_shutdown_fails_no_job(worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stopped at once ends its run through the hard time limit's path; Celery writes no failure then,
    and neither does the task: the job is the sweeper's, to run again."""
    from celery.worker import state

    _started_by(worker_job, NODE, POOL_PROCESS)
    monkeypatch.setattr(state, "should_terminate", True)
    _hard_limit(worker_job)
    assert worker_job.row().status == jobs.Status.RUNNING


def _sent_again(job: WorkerJob) -> None:
    """The job's run of sending 0 started and went silent (its worker killed), and the sweeper sent it again."""
    _started_by(job, NODE, POOL_PROCESS)
    assert taken_back(job.db, job.id, 0) == "queued"


def _written(job: WorkerJob, dispatch: int) -> Path:
    path = job.storage.output_path(job.id, dispatch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"a checkpoint never recorded")
    return path


def test_a_run_that_succeeds_removes_what_a_killed_run_before_it_left(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while it wrote its checkpoint, or retried recording it, left output/0. The run the sweeper
    sent next succeeds: the job's folder holds the checkpoint it recorded, not a second one until it is
    deleted."""
    from worker.tasks import sanitize_job

    _sent_again(worker_job)
    _written(worker_job, 0)
    _engine(monkeypatch, None)
    sanitize_job(worker_job.id, 1)
    job = worker_job.row()
    assert job.status == jobs.Status.SUCCEEDED and job.artifact(jobs.OUTPUT).path == output_name(1)
    assert _outputs(worker_job) == [worker_job.storage.output_path(worker_job.id, 1)]
    assert [path.name for path in (worker_job.storage.job_dir(worker_job.id) / "output").iterdir()] == ["1"]


def test_a_late_failure_of_a_replaced_run_leaves_its_successors_folder(worker_job: WorkerJob) -> None:
    """The run of sending 0, cut off from the database and replaced, reaches its hard limit while sending 1's
    run writes its checkpoint: it removes its own output and leaves the one being written."""
    _sent_again(worker_job)
    _started_by(worker_job, "celery@another-worker", POOL_PROCESS, dispatch=1)
    _written(worker_job, 0)
    being_written = _written(worker_job, 1)
    _hard_limit(worker_job)
    assert worker_job.row().status == jobs.Status.RUNNING and _outputs(worker_job) == [being_written]


@pytest.mark.parametrize(("max_attempts", "became"), [(1, jobs.Status.FAILED), (3, jobs.Status.QUEUED)])
@pytest.mark.parametrize("remade", [False, True], ids=["folder-gone", "folder-remade"])
def test_a_run_whose_folder_the_sweeper_removed_is_no_internal_error(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    max_attempts: int, became: jobs.Status, remade: bool,
) -> None:
    """A run cut off from the database goes silent; the sweeper ends the job (or sends it again) and removes
    the run's folder. The run, alive after all, fails: on the rename of its checkpoint into the folder gone, or,
    having made the folder again (`write_checkpoint` makes its parents), on a full disk. A warning says so, not
    an internal error or a full storage at ERROR; the job stays as the sweeper left it, and what the run wrote
    after the removal is removed too."""
    import worker.tasks

    def sanitize(files, params, on_event, should_stop, **kwargs) -> dict:
        files.out.parent.mkdir(parents=True, exist_ok=True)
        files.out.with_name(".tmpX7q2").write_bytes(b"half a checkpoint")  # safetensors' file before its rename
        assert taken_back(worker_job.db, worker_job.id, 0, max_attempts) == became
        worker_job.storage.remove_outputs(worker_job.id, through=0, keep=None)
        if not remade:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(files.out))  # the rename's
        files.out.parent.mkdir(parents=True, exist_ok=True)
        files.out.with_name(".tmpY8r3").write_bytes(b"a quarter of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(files.out))

    monkeypatch.setattr(worker.tasks, "sanitize", sanitize)
    _run(worker_job)
    job = worker_job.row()
    assert job.status == became and (job.error is None) == (became == jobs.Status.QUEUED)
    assert [r for r in caplog.records if r.levelname == "ERROR" or "internal error" in r.getMessage()] == []
    assert any(r.levelname == "WARNING" and "taken from it" in r.getMessage() for r in caplog.records)
    assert _outputs(worker_job) == []


def test_a_run_that_fails_while_the_database_cannot_say_whose_the_job_is_writes_its_failure(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the sweeper took the job from a failing run is asked of the database (`_still_runs`); where it
    cannot answer, the failure is written as ever (a write that changes nothing if the job is another's).
    Taken for taken, the run would write nothing: the job would sit running until the sweeper ran it again."""
    _engine(monkeypatch, InputError("the checkpoint does not fit wrn-16-1"))
    monkeypatch.setattr(jobs, "heartbeat", refused)  # the database refuses the question
    _run(worker_job)
    job = worker_job.row()
    assert (job.status, job.error) == (jobs.Status.FAILED, "the checkpoint does not fit wrn-16-1")
    assert _outputs(worker_job) == []


def test_the_hard_limits_failure_gives_up_on_a_row_the_killed_process_holds_locked(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main process writes the failure before billiard kills the pool process, and that process, stopped
    or stuck between a write of the job's row and its commit, holds the row locked. PostgreSQL kept the main
    process waiting for ever, and the worker took no message again. It gives up now; the sweeper takes the
    job."""
    settings = Settings(database_url=postgres_url, storage_dir=tmp_path / "storage", max_images=1234)
    with _recorded_job(settings, monkeypatch) as job:
        _started_by(job, NODE, POOL_PROCESS)
        holder = Database(postgres_url)
        with holder.session() as held:
            held.execute(select(jobs.Job).where(jobs.Job.id == job.id).with_for_update())
            report = threading.Thread(target=_hard_limit, args=(job,), daemon=True)
            report.start()
            report.join(timeout=30)
            waited = report.is_alive()
        report.join()
        holder.dispose()
        assert not waited, "the hard limit's failure waited on the locked row"
        assert (job.row().status, job.row().error) == (jobs.Status.RUNNING, None)  # left to the sweeper


@pytest.mark.parametrize("answered", [0, 1], ids=["out-from-the-start", "out-after-the-failure-is-written"])
def test_the_hard_limits_report_does_not_wait_out_a_database_outage(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch, worker_clock: StoodStill, answered: int
) -> None:
    """It runs in the process that receives the worker's messages: waiting out a database outage there (ten
    minutes, as a job's own last write does) would stall the whole worker. A job whose failure is not written
    is silent, and the sweeper's to take."""
    import worker.tasks

    class OutAfter(Database):
        sessions = 0

        @contextmanager
        def session(self) -> Iterator:
            OutAfter.sessions += 1
            if OutAfter.sessions > answered:
                refused()
            with super().session() as session:
                yield session

    monkeypatch.setattr(worker.tasks, "Database", OutAfter)
    _started_by(worker_job, NODE, POOL_PROCESS)
    _hard_limit(worker_job)
    assert worker_clock.now == 0 and OutAfter.sessions == 1
    assert worker_job.row().status == (jobs.Status.RUNNING, jobs.Status.FAILED)[answered]


def _soft_limit(*args, **kwargs) -> None:
    raise SoftTimeLimitExceeded()


@pytest.mark.parametrize(("refusal", "time_limit", "waited"), [(refused, 6 * 3600, (585, 600)),
                                                                (refused, 20, (1, 10)),
                                                                (_soft_limit, 6 * 3600, (0, 0))],
                         ids=["outage", "outage-with-a-short-time-limit", "soft-time-limit"])
def test_a_start_the_database_refuses_puts_the_message_back_and_leaves_the_job_alone(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch, worker_clock: StoodStill, refusal, time_limit: int,
    waited: tuple[int, int]
) -> None:
    """A copy of a live run's message whose start the database refused (SQLite busy, an outage) escaped as the
    task's error: Celery's failure handler then failed the live run's job and removed the checkpoint it was
    writing (the review of these mends). The start is tried through an outage, as a job's last word is, but for
    half the time limit at most, lest the soft limit end it the same way (the second review); then its message
    goes back to the queue, and nothing of the job is touched."""
    import worker.tasks
    from worker.tasks import sanitize_job

    with worker_job.db.session() as session:
        jobs.start_attempt(session, worker_job.id, dispatch=0, runner="a run")  # the live run, elsewhere
    being_written = _written(worker_job, 0)
    settings = worker_job.settings.model_copy(update={"job_time_limit": time_limit})
    monkeypatch.setattr(worker.tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(jobs, "start_attempt", refusal)
    result = sanitize_job.apply(args=(worker_job.id, 0))  # Celery's own handling of what the task raises
    assert result.state == "REJECTED" and waited[0] <= worker_clock.now <= waited[1]
    assert result.result.requeue  # back to the queue, not dropped: the job still waits for its run
    assert worker_job.row().status == jobs.Status.RUNNING and _outputs(worker_job) == [being_written]


def test_a_beat_stuck_on_a_stalled_server_does_not_hold_the_job(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stops answering on an open connection hangs the beat's query; the job's end must not wait
    for it (it waited until the hard time limit)."""
    from worker.tasks import heartbeat

    stuck, release = threading.Event(), threading.Event()

    def stalled(session, job_id: str, dispatch: int) -> bool:  # the query sent, no answer coming
        stuck.set()
        release.wait()
        return False

    def job() -> None:
        with heartbeat(worker_job.db, worker_job.id, 0, interval=0.01):
            assert stuck.wait(10)

    monkeypatch.setattr(jobs, "heartbeat", stalled)
    ended = threading.Thread(target=job, daemon=True)
    ended.start()
    ended.join(10)
    held = ended.is_alive()
    release.set()
    assert not held


def test_an_input_removed_from_storage_fails_the_job_naming_it(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list = []
    _engine(monkeypatch, None, calls)
    worker_job.storage.path(worker_job.id, "inputs/clean_data").unlink()
    _run(worker_job)
    job = worker_job.row()
    assert job.status == jobs.Status.FAILED and calls == []
    assert "clean_data file is no longer in the service's storage" in job.error and "submit" in job.error
    assert str(worker_job.settings.storage_dir) not in job.error


def test_the_worker_gives_the_engine_the_operators_image_cap_and_the_jobs_time_left(
    worker_job: WorkerJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time left (what `auto` runs its candidates within) counts from the task's start, as Celery's
    limits do, less a reserve for writing the result: a minute of the default limit of six hours."""
    calls: list = []
    _engine(monkeypatch, None, calls)
    _run(worker_job)
    [call] = calls
    assert call["max_images"] == 1234 and worker_job.row().status == jobs.Status.SUCCEEDED
    limit = worker_job.settings.job_time_limit
    assert limit - 90 < call["time_limit"] <= limit - 60


def test_the_reserve_for_finishing_is_a_share_of_a_short_limit_and_a_minute_at_most() -> None:
    from worker.tasks import engine_time

    assert engine_time(10, 2.0) == pytest.approx(7.5)
    assert engine_time(6 * 3600, 100.0) == 6 * 3600 - 160
