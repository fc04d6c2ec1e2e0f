"""The HTTP client of the service, behind `nad submit`: upload, follow the job, download the result.

It needs httpx, tqdm and pydantic, never torch, so it runs on a user's machine without torch. Uploads stream
from disk with a progress bar, and carry an Idempotency-Key so that a POST retried after a dropped connection
cannot create a second job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from tqdm.utils import CallbackIOWrapper

from core.engine.commands import (
    StageBar,
    cannot_read,
    fail,
    missing_input,
    prepare_outputs,
    small_json_file,
    table,
    terminal_bar,
)

T = TypeVar("T")
FINISHED = ("succeeded", "failed", "cancelled")
# Attempts of the upload when the connection fails before an answer arrives. An answer is final, but for those
# of a service that is there and unavailable (UNAVAILABLE), which `Client.patiently` waits out.
UPLOAD_TRIES = 3
# Seconds to connect, and to wait between bytes of an answer (an upload has no write timeout).
TIMEOUT = 60.0
# Answers of a service that is restarting or behind a proxy whose backend is: asked again, like no answer.
UNAVAILABLE = (502, 503, 504)
# Seconds `wait` keeps asking a service that does not answer before it gives up (the job goes on without it).
POLL_PATIENCE = 600.0


class ServiceError(Exception):
    """The service answered with an error (its problem detail is the message, `status` its HTTP status) or
    could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    response.read()  # a streamed answer (a download) has not read its problem document yet
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    raise ServiceError(f"{response.status_code} {response.reason_phrase}: {detail}", response.status_code)


class Client:
    def __init__(self, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # No write timeout: a large upload on a slow line takes as long as it takes.
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(TIMEOUT, write=None))

    def close(self) -> None:
        self.http.close()

    def patiently(self, call: Callable[[], T], what: str, then: str, interval: float = 2.0,
                  patience: float = POLL_PATIENCE, on_wait: Callable[[Exception], object] = lambda error: None) -> T:
        """`call()`, asked again while the service does not answer or answers 502, 503 or 504, until that has
        lasted `patience` seconds: a restart of the service, or its database out, ends; the job goes on
        meanwhile. Giving up says `what` was asked and `then` what the user can do; `on_wait(error)` is called
        before each wait."""
        silent_since = None
        while True:
            try:
                return call()
            except (httpx.TransportError, ServiceError) as error:
                if isinstance(error, ServiceError) and error.status not in UNAVAILABLE:
                    raise
                silent_since = time.monotonic() if silent_since is None else silent_since
                if time.monotonic() - silent_since >= patience:
                    raise ServiceError(f"no answer about {what} for {patience:.0f} s ({error}); {then}") from None
                on_wait(error)
                time.sleep(interval)

    def submit(self, files: dict[str, Path], params: dict[str, Any], show_progress: bool = True,
               interval: float = 10.0) -> dict[str, Any]:
        """Upload a job (files by form field: model, clean_data, ...) and return the job resource. A service
        that answers it is unavailable (its database or queue out) is sent the upload again under the same
        Idempotency-Key, every `interval` seconds for up to POLL_PATIENCE."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        return self.patiently(lambda: self._upload(files, params, headers, show_progress), "the upload",
                              "GET /jobs lists the job if it was kept; else send it again later", interval=interval,
                              on_wait=lambda error: print(f"{error}; sending the upload again in {interval:.0f} s",
                                                          file=sys.stderr))

    def _upload(self, files: dict[str, Path], params: dict[str, Any], headers: dict[str, str],
                show_progress: bool) -> dict[str, Any]:
        """One upload; a connection that fails before an answer is tried UPLOAD_TRIES times, then said as
        unreachable (not waited out: a wrong URL is said in seconds)."""
        for attempt in range(1, UPLOAD_TRIES + 1):
            try:
                with self._streams(files, show_progress) as streams:
                    response = self.http.post("/sanitize", files=streams, data={"params": json.dumps(params)},
                                              headers=headers)
                break
            except httpx.TransportError as error:
                if attempt == UPLOAD_TRIES:
                    raise ServiceError(f"could not reach {self.http.base_url}: {error}") from None
                time.sleep(2 * attempt)
        return _checked(response).json()

    @contextmanager
    def _streams(self, files: dict[str, Path], show_progress: bool) -> Iterator[dict[str, Any]]:
        """The files opened for httpx's multipart encoder, which reads them in chunks; one bar for all."""
        total = sum(path.stat().st_size for path in files.values())
        with ExitStack() as stack:
            bar = stack.enter_context(terminal_bar(show_progress, total=total, unit="B", unit_scale=True,
                                                   desc="upload"))
            streams = {}
            for field, path in files.items():
                stream = stack.enter_context(path.open("rb"))
                streams[field] = (path.name, CallbackIOWrapper(bar.update, stream, "read"))
            yield streams

    def job(self, job_id: str) -> dict[str, Any]:
        return _checked(self.http.get(f"/jobs/{job_id}")).json()

    def wait(self, job_id: str, interval: float = 2.0, show_progress: bool = True,
             patience: float = POLL_PATIENCE) -> dict[str, Any]:
        """Poll the job until it has finished, showing its stage, epoch and percent; the final resource.

        A job runs for hours and the service may restart meanwhile (the job goes on): no answer, or a 502, 503
        or 504, is asked again until it has lasted `patience` seconds."""
        percent = 0.0
        with closing(StageBar("{l_bar}{bar}| [{elapsed}]", show_progress)) as bar:
            while True:
                job = self.patiently(
                    lambda: self.job(job_id), f"job {job_id}",
                    f"it goes on at the service: ask again with GET /jobs/{job_id}", interval, patience,
                    on_wait=lambda _error, shown=percent: bar.show("service unreachable, asking again", shown))
                progress, percent = job["progress"], job["progress"]["percent"]
                epoch = f" {progress['epoch']}/{progress['epochs']}" if progress.get("epoch") else ""
                bar.show(f"{job['status']} {progress.get('stage') or ''}{epoch}".strip(), percent)
                if job["status"] in FINISHED:
                    return job
                time.sleep(interval)

    def metrics(self, job_id: str) -> dict[str, Any]:
        """The job's report, waited for through a restart of the service or its database's outage."""
        return self.patiently(lambda: _checked(self.http.get(f"/jobs/{job_id}/metrics")).json(),
                              f"job {job_id}'s metrics", f"they stay at the service: GET /jobs/{job_id}/metrics")

    def download(self, job_id: str, destination: Path, show_progress: bool = True) -> Path:
        """The cleansed checkpoint at `destination`, downloaded again from the start where the service stops
        answering or is unavailable meanwhile (`patiently`)."""
        return self.patiently(lambda: self._download(job_id, destination, show_progress), f"job {job_id}'s model",
                              f"it stays at the service: GET /jobs/{job_id}/model")

    def _download(self, job_id: str, destination: Path, show_progress: bool) -> Path:
        """Stream the cleansed checkpoint to `destination`, checking it against its ETag (the sha256)."""
        partial = destination.with_name(destination.name + ".part")
        digest = hashlib.sha256()
        with self.http.stream("GET", f"/jobs/{job_id}/model") as response:
            _checked(response)
            total = int(response.headers.get("content-length", 0)) or None
            with partial.open("wb") as out, terminal_bar(show_progress, total=total, unit="B", unit_scale=True,
                                                          desc="download") as bar:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        expected = response.headers.get("etag", "").strip('"')
        if expected and digest.hexdigest() != expected:
            partial.unlink()
            raise ServiceError(f"job {job_id}'s model arrived damaged (sha256 mismatch); download it again")
        partial.replace(destination)
        return destination


def _params(text: str) -> dict[str, Any]:
    """--params: inline JSON, or @file; a ValueError says which it was and why it is not a JSON object."""
    source = text[1:] if text.startswith("@") else "--params"
    try:
        params = json.loads(small_json_file(Path(source), "the service refuses larger params")
                            if text.startswith("@") else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} is not JSON: {error}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{source} is not a JSON object of parameters, as README's example shows")
    return params


def _service_url(url: str) -> str:
    """The service's base URL, or a ValueError where httpx cannot use it: it would raise InvalidURL, outside any
    request, or retry an unsupported scheme as if the service were down."""
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL as error:
        raise ValueError(f"the service URL {url} is not usable: {error}") from None
    if scheme not in ("http", "https"):
        raise ValueError(f"the service URL {url} is not usable: it must start with http:// or https://")
    return url


def run_submit(args: argparse.Namespace) -> int:
    """`nad submit`: upload, follow, download, and print the before/after table. Exit 0 when the job
    succeeded, 1 when it failed or was cancelled, 2 when it could not be submitted or followed."""
    from core.settings import ClientSettings

    files = {field: path for field, path in (("model", args.model), ("clean_data", args.clean_data),
                                             ("test_data", args.test_data), ("poison_data", args.poison_data),
                                             ("teacher", args.teacher)) if path is not None}
    settings = ClientSettings()
    try:
        params = _params(args.params)  # first: a refusal leaves no folder behind
        url = _service_url(args.url or settings.api_url)
        problem = missing_input(*files.values()) or prepare_outputs(args.out, inputs=tuple(files.values()))
    except OSError as error:
        problem = cannot_read(error)
    except ValueError as error:
        problem = str(error)
    if problem:
        return fail(problem)
    client = Client(url, args.key or settings.api_key)
    try:
        job = client.submit(files, params)
        print(f"job {job['id']} queued", file=sys.stderr)
        job = client.wait(job["id"])
        if job["status"] != "succeeded":
            print(f"job {job['id']} {job['status']}: {job.get('error') or 'no result'}", file=sys.stderr)
            return 1
        out = client.download(job["id"], args.out or Path(f"{job['id']}.safetensors"))
        metrics = client.metrics(job["id"])
    except (ServiceError, OSError, ValueError) as error:
        return fail(str(error))
    except httpx.HTTPError as error:  # the connection lost mid-download, say: not an OSError
        return fail(f"lost {client.http.base_url} ({error!r}); the job's results stay at the service")
    finally:
        client.close()
    print(metrics["evaluation"]["note"])
    print(table(metrics["before"], metrics["after"]))
    print(f"cleansed checkpoint: {out}")
    return 0
