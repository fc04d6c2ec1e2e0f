"""The job endpoints: submit, look, list, cancel, delete, and fetch the metrics and the cleansed model."""

from __future__ import annotations

import json
import logging
from email.utils import formatdate
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from api import uploads
from api.auth import Owner
from api.problems import FieldError, ProblemError, field_errors, invalid, response_header, responses
from api.schemas import JobPage, JobResource, Metrics
from api.services import Reading, Service, Services
from core import jobs
from core.jobs import OUTPUT, Job, Status
from core.params import CAPPED_EPOCHS, SanitizeParams
from core.storage import JOB_ID
from worker.dispatch import send_job

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

PARAMS_EXAMPLE = {
    "arch": "wrn-16-1", "num_classes": 10, "epochs": 20, "teacher_epochs": 10, "target_label": 5,
    "trigger": {"type": "badnets", "position": [-3, -3],
                "pattern": [[0, 0, 255], [0, 255, 0], [255, 0, 255]]},
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": list(uploads.REQUIRED),
                    "properties": {
                        # minLength: an empty file is refused (422), so a client knows before sending one.
                        **{name: {"type": "string", "format": "binary", "minLength": 1, "description": description}
                           for name, description in uploads.FILE_FIELDS.items()},
                        uploads.PARAMS: {
                            "allOf": [{"$ref": "#/components/schemas/SanitizeParams"}],
                            "description": "the job's parameters as a JSON object (a form field, not a file)",
                            "examples": [PARAMS_EXAMPLE],
                        },
                    },
                },
                "encoding": {uploads.PARAMS: {"contentType": "application/json"}},
            }
        },
    }
}
# Seconds a client refused for a full queue is asked to wait: jobs take minutes, so sooner would mostly be
# refused again.
QUEUE_FULL_RETRY_AFTER = 60
# A retry under an Idempotency-Key whose first job was withdrawn while the retry was received: its key is free.
FIRST_NOT_KEPT = "the first upload under this Idempotency-Key was not kept; send it again"
IdempotencyKey = Annotated[
    str | None,
    Header(min_length=1, max_length=255,
           description="any unique string; a retried POST with the same key (and API key) returns the job the "
                       "first one created instead of a second job; the key with other params or files is a 422"),
]


def _owned(session: Session, job_id: str, owner: str) -> Job:
    # Something that is not a job id names no job, and is not sent to the database: PostgreSQL answers some
    # strings (a NUL byte) with an error instead of no row.
    job = jobs.get_job(session, job_id, owner) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise ProblemError(404, f"there is no job {job_id} for this API key: it was deleted, never existed, "
                                "or belongs to another key; GET /jobs lists yours")
    return job


def _not_succeeded(job: Job, what: str) -> ProblemError:
    """409 for a result asked of a job that has none (yet), saying what happens next."""
    reason = {
        Status.QUEUED: "it is queued and has not started; ask again once it has succeeded",
        Status.RUNNING: f"it is running ({round(100 * job.progress)}% done); ask again once it has succeeded",
        Status.CANCELLING: "it is being cancelled and will have none",
        Status.CANCELLED: "it was cancelled; submit it again for a result",
        Status.FAILED: f"it failed: {job.error}",
    }[Status(job.status)]
    return ProblemError(409, f"job {job.id} has no {what}: {reason}")


def _accepted(response: Response, job: Job) -> JobResource:
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobResource.of(job)


def _params(text: str, max_epochs: int) -> SanitizeParams:
    """The job's parameters, or a 422 listing every field to fix: the schema's errors and the operator's
    epoch cap's together, so that a client does not fix one to be told of the other."""
    try:
        params = SanitizeParams.model_validate_json(text)
    except ValidationError as error:
        errors = field_errors(error.errors(), "params")
        refused = {each.field for each in errors}
        over = [each for each in _over_the_cap(_fields(text), max_epochs) if each.field not in refused]
        raise invalid(errors + over) from None
    if over := _over_the_cap(params.model_dump(), max_epochs):
        raise invalid(over)
    return params


def _fields(text: str) -> dict[str, Any]:
    """The fields of params that did not validate, as sent: {} when they are no JSON object."""
    try:
        fields = json.loads(text)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _over_the_cap(fields: dict[str, Any], max_epochs: int) -> list[FieldError]:
    """The operator's cap on training length (NAD_MAX_EPOCHS), tighter than the schema's: a job that could
    not finish within the time limit is refused now rather than failed hours later."""
    return [FieldError(field=f"params.{name}", message=f"{value} is more than this service's limit of "
                                                       f"{max_epochs} epochs; ask for at most {max_epochs}")
            for name in CAPPED_EPOCHS
            if isinstance(value := fields.get(name), int) and not isinstance(value, bool) and value > max_epochs]


def _check_queue(service: Services, owner: str, idempotency_key: str | None) -> None:
    """Refuse (429) a key that already has NAD_MAX_QUEUED_JOBS jobs waiting or running, so that one client
    cannot fill the queue. One count query, before the body is read: a refused client has not uploaded
    gigabytes for nothing. A retry of a submission that made its job is let through to get that job back.
    Uploads sent at once all pass this count: `_create` counts again once the job is recorded."""
    limit = service.settings.max_queued_jobs
    with service.db.session() as session:
        if idempotency_key and jobs.find_by_idempotency_key(session, owner, idempotency_key) is not None:
            return
        count = jobs.count_unfinished(session, owner)
    if count >= limit:
        raise _queue_full(count, limit)


def _queue_full(count: int, limit: int) -> ProblemError:
    held = "1 job" if count == 1 else f"{count} jobs"
    return ProblemError(429, f"this API key already has {held} queued or running, and this service takes at "
                             f"most {limit} at once per key; wait until one has finished (GET /jobs lists them) "
                             "or cancel one, then send this job again",
                        headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)})


@router.post(
    "/sanitize",
    status_code=202,
    summary="Submit a checkpoint to sanitize",
    openapi_extra=UPLOAD_BODY,
    responses={202: {"headers": {"Location": response_header("the job's path, `/jobs/{id}`")}},
               **responses(400, 401, 413, 415, 422, 429, 503, 507)},
)
async def submit(request: Request, response: Response, owner: Owner, service: Service,
                 idempotency_key: IdempotencyKey = None) -> JobResource:
    """Upload a suspect checkpoint, clean data and parameters; the job is queued for a worker.

    Answers `202 Accepted` with the job and `Location: /jobs/{id}`. Each file may be up to
    `NAD_MAX_UPLOAD_BYTES` (413 past it). Files are streamed to disk and checked by the worker, not here: a
    checkpoint or archive the engine cannot use fails the job with a message saying why.

    A key that already has `NAD_MAX_QUEUED_JOBS` jobs queued or running is answered 429 (with `Retry-After`)
    before its body is read; an epoch count past `NAD_MAX_EPOCHS`, or a `teacher` for a method that uses none,
    is a 422 naming the field; a server whose disk is full answers 507.

    A retry with an `Idempotency-Key` already used is received like any upload (so the client is never cut
    off mid-body), then discarded, and answered with the first job; one whose params or files differ from
    the first's is another request under a used key, answered 422.
    """
    await run_in_threadpool(_check_queue, service, owner, idempotency_key)
    job_id = jobs.new_job_id()
    try:
        upload = await uploads.receive(request, service.storage, job_id, service.settings.max_upload_bytes)
        params = _params(upload.params, service.settings.max_epochs)
        if "teacher" in upload.files and params.teacher_unused:
            raise invalid([FieldError(field="teacher", message=params.teacher_unused)])
    except BaseException:
        service.storage.discard_incoming(job_id)
        raise
    job = await run_in_threadpool(_create, service, job_id, owner, params, upload, idempotency_key)
    return _accepted(response, job)


def _create(service: Services, job_id: str, owner: str, params: SanitizeParams, upload: uploads.Upload,
            idempotency_key: str | None) -> Job:
    """Record the job whose upload was received, move the upload into place, then send its id to the workers,
    in that order: a worker never receives an id the database does not know, and a process killed before the
    record leaves its upload in its own incoming/ folder, which the next API to start removes (moved first, a
    job folder without a job stayed for good: the chaos hunt's kill while the database was slow)."""
    try:
        with service.db.session() as session:
            job = jobs.create_job(session, job_id, owner, service.settings.queue, params.model_dump(mode="json"),
                                  list(upload.files.values()), idempotency_key)
    except jobs.DuplicateRequest:
        return _repeat(service, job_id, owner, params, upload, idempotency_key)
    except BaseException:
        service.storage.discard_incoming(job_id)
        raise
    _move_into_place(service, job_id)
    _within_the_cap(service, owner, job_id)
    _send(service, job)
    return job


def _repeat(service: Services, job_id: str, owner: str, params: SanitizeParams, upload: uploads.Upload,
            idempotency_key: str | None) -> Job:
    """The first job sent under `idempotency_key`, for a repeat of its request; this upload is discarded or
    stands in for the first's files (`_stand_in`). A key whose first job was withdrawn is free again (503), one
    used for another request is refused (422)."""
    storage = service.storage
    with service.db.session() as session:
        first = jobs.find_by_idempotency_key(session, owner, idempotency_key)
    if first is None:  # withdrawn since (its queue place or its broker refused): the key is free again
        storage.discard_incoming(job_id)
        raise ProblemError(503, FIRST_NOT_KEPT) from None
    if not _same_request(first, params, upload):
        storage.discard_incoming(job_id)
        raise ProblemError(422, f"the Idempotency-Key {idempotency_key!r} was used for job {first.id}, which "
                                "was sent with other parameters or files; send a new job under a new key") from None
    _stand_in(service, job_id, first)
    return first


def _move_into_place(service: Services, job_id: str) -> None:
    """Move a recorded job's upload into its folder; a move that fails withdraws the job, which no worker
    has been sent."""
    try:
        if not service.storage.adopt(job_id):
            log.info("job %s: a repeat of its upload was in place first; this copy is discarded", job_id)
    except BaseException:
        service.storage.discard_incoming(job_id)
        with service.db.session() as session:
            jobs.withdraw(session, job_id)
        raise


def _send(service: Services, job: Job) -> None:
    """Send a recorded job to the workers. A broker that refuses it has the job withdrawn and its files
    removed, and the client told to send it again (503): a job the client was told nothing of is not kept."""
    try:
        send_job(service.queue, job.id, job.dispatch)
    except Exception:
        log.exception("job %s: could not be sent to the broker", job.id)
        with service.db.session() as session:
            jobs.withdraw(session, job.id)
        service.storage.remove(job.id)
        raise ProblemError(503, "the job queue is unreachable right now, so the job was not kept; send it "
                                "again in a minute") from None


def _stand_in(service: Services, job_id: str, first: Job) -> None:
    """A repeated upload takes the place of its first's files where they never reached the job's folder, and
    the job is sent: the first try's job was recorded, but its answer was lost (a 503 whose commit went
    through) or its API was killed before the move, and the retry holds the only copy. Else it is discarded.
    The first's API, should it live and move its own copy after this one, keeps this one (`Storage.adopt`);
    should it withdraw the job meanwhile (its queue place or its broker refused), the copy goes and the retry
    is told to send again, under a key that is free again."""
    storage = service.storage
    if first.status != Status.QUEUED or storage.job_dir(first.id).is_dir():
        storage.discard_incoming(job_id)
        return
    try:
        moved = storage.adopt(job_id, into=first.id)
    except OSError:
        log.exception("job %s: a repeat of its upload could not take the place of its files", first.id)
        storage.discard_incoming(job_id)
        return
    if not moved:
        return
    with service.db.session() as session:
        withdrawn = session.get(Job, first.id) is None
    if withdrawn:
        storage.remove(first.id)
        raise ProblemError(503, FIRST_NOT_KEPT)
    log.warning("job %s: its files had not reached storage; a repeat of its upload took their place", first.id)
    try:
        send_job(service.queue, first.id, first.dispatch)
    except Exception:  # the sweeper sends it once the broker is back: the job is recorded
        log.exception("job %s: could not be sent to the broker", first.id)


def _same_request(job: Job, params: SanitizeParams, upload: uploads.Upload) -> bool:
    """Whether a retry under `job`'s Idempotency-Key asks for that job: the same parameters and the same files
    by their sha256. A key used again for another request is refused (the IETF's idempotency-key draft), not
    answered with a job whose work is not what was sent."""
    inputs = {artifact.role: artifact.sha256 for artifact in job.artifacts if artifact.role != OUTPUT}
    sent = {role: record.sha256 for role, record in upload.files.items()}
    return job.params == params.model_dump(mode="json") and inputs == sent


def _within_the_cap(service: Services, owner: str, job_id: str) -> None:
    """Count the owner's jobs again, this one recorded: uploads sent at once all passed `_check_queue` before
    any was recorded. Past the cap this one is withdrawn (429). Two racing for the last place may both be
    refused, to be sent again; the cap is never passed."""
    limit = service.settings.max_queued_jobs
    with service.db.session() as session:
        count = jobs.count_unfinished(session, owner)
        if count > limit:
            jobs.withdraw(session, job_id)
    if count > limit:
        service.storage.remove(job_id)
        raise _queue_full(count - 1, limit)


@router.get("/jobs", summary="List your jobs, newest first", responses=responses(401, 422, 503))
async def list_jobs(
    owner: Owner,
    session: Reading,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    # A cursor is a job id (the last of the previous page); anything else is a 422, not a query that
    # PostgreSQL may answer with an error (a NUL byte).
    cursor: Annotated[str | None, Query(pattern=f"^{JOB_ID.pattern}$",
                                        description="`next_cursor` of the previous page")] = None,
    status: Annotated[list[Status], Query(description="only jobs in this status; repeated, in any of them "
                                                       "(`?status=queued&status=running`)")] = (),
) -> JobPage:
    """Newest first by when each upload began (a job's id is made then, and pages by it stay stable while jobs
    are added): a slow upload lists below one begun after it, though that one was recorded first."""
    page, next_cursor = await session.run_sync(jobs.list_jobs, owner, limit, cursor, status)
    return JobPage(items=[JobResource.of(job) for job in page], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", summary="A job's status and progress", responses=responses(401, 404, 503))
async def get_job(job_id: str, owner: Owner, session: Reading) -> JobResource:
    return JobResource.of(await session.run_sync(_owned, job_id, owner))


@router.get("/jobs/{job_id}/metrics", summary="Before/after ACC and ASR of a succeeded job",
            responses=responses(401, 404, 409, 503), response_model_exclude_unset=True)
async def get_metrics(job_id: str, owner: Owner, session: Reading) -> Metrics:
    job = await session.run_sync(_owned, job_id, owner)
    if job.status != Status.SUCCEEDED:
        raise _not_succeeded(job, "metrics")
    return Metrics(job_id=job.id, **job.report)


# What a download answers with, whole or in part: what resuming it and checking the copy need.
FILE_HEADERS = {
    "ETag": response_header("the checkpoint's sha256, quoted"),
    "Last-Modified": response_header("when the checkpoint was written"),
    "Content-Disposition": response_header("`attachment; filename=\"<id>.safetensors\"`"),
    "Accept-Ranges": response_header("`bytes`"),
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the cleansed checkpoint (safetensors)", "headers": FILE_HEADERS,
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    206: {"description": "the byte range asked for with `Range`; several ranges come as multipart/byteranges",
          "headers": {**FILE_HEADERS,
                      "Content-Range": response_header("`bytes <first>-<last>/<size>`, for one range (several: in "
                                                       "each part)", required=False)},
          "content": {media_type: {"schema": {"type": "string", "format": "binary"}}
                      for media_type in ("application/octet-stream", "multipart/byteranges")}},
    304: {"description": "`If-None-Match` holds the checkpoint's ETag: the copy you have is current",
          "headers": {"ETag": FILE_HEADERS["ETag"]}},
    **responses(400, 401, 404, 409, 412, 416, 500, 503),
}


# HEAD too: download managers and `curl -I` ask a file's size and ETag before they fetch it. One route a
# method, so that each has its own operation id.
@router.head("/jobs/{job_id}/model", summary="The cleansed checkpoint's headers (size, ETag), without the file",
             response_class=FileResponse, responses=MODEL_RESPONSES)
@router.get("/jobs/{job_id}/model", summary="Download the cleansed checkpoint", response_class=FileResponse,
            responses=MODEL_RESPONSES)
async def get_model(
    job_id: str,
    owner: Owner,
    service: Service,
    session: Reading,
    range_: Annotated[str | None, Header(alias="range", description="e.g. `bytes=0-1048575`")] = None,
    if_range: Annotated[str | None, Header(description="the ETag (or Last-Modified date) of the copy whose "
                                                       "download `Range` resumes: another answers the whole "
                                                       "file (200)")] = None,
    if_none_match: Annotated[str | None, Header(description="an ETag you have")] = None,
    if_match: Annotated[str | None, Header(description="the ETag the file must have: another answers 412")] = None,
) -> Response:
    """The safetensors file, with its sha256 as `ETag`; `Range` resumes a download (206). `HEAD` answers the
    headers alone."""
    job = await session.run_sync(_owned, job_id, owner)
    output = job.artifact(OUTPUT)
    if job.status != Status.SUCCEEDED or output is None:
        raise _not_succeeded(job, "model")
    path = service.storage.path(job.id, output.path)
    if not path.is_file():
        raise _missing_output(job.id)
    etag = f'"{output.sha256}"'
    if if_match is not None and not _strongly_matches(if_match, etag):
        raise ProblemError(412, f"the checkpoint's ETag is {etag}, not one If-Match names")
    if if_none_match and _matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    # A malformed byte range is a problem here: FileResponse would answer it 400 in plain text. An If-Range that
    # names another copy asks for the whole file, so its Range is not checked against this one's size (RFC
    # 9110, 13.1.5); one that names this copy, by ETag or by the Last-Modified date FileResponse sends, resumes
    # it. One stat for both, so that they compare the same date.
    stat = path.stat()
    if _in_bytes(range_) and if_range in (None, etag, formatdate(stat.st_mtime, usegmt=True)):
        _check_range(range_, output.size)
    return _Download(path, media_type="application/octet-stream", filename=f"{job.id}.safetensors",
                     headers={"ETag": etag}, stat_result=stat)


def _in_bytes(range_: str | None) -> bool:
    return range_ is not None and range_.partition("=")[0].strip().lower() == "bytes"


class _Download(FileResponse):
    """A FileResponse that ignores a Range in a unit other than bytes, as a server must (RFC 9110, 14.2):
    Starlette's answers it 400."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _in_bytes(Headers(scope=scope).get("range")):
            scope = {**scope, "headers": [(name, value) for name, value in scope["headers"] if name != b"range"]}
        await super().__call__(scope, receive, send)


def _matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110, 13.1.2): `*`, or a listed tag equal to `etag` once a `W/`
    is dropped, as a proxy that compresses the file adds it."""
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or etag in (tag.removeprefix("W/") for tag in tags)


def _strongly_matches(if_match: str, etag: str) -> bool:
    """If-Match's strong comparison (RFC 9110, 13.1.1): `*`, or a listed tag equal to `etag` as it is."""
    tags = [tag.strip() for tag in if_match.split(",")]
    return "*" in tags or etag in tags


def _missing_output(job_id: str) -> ProblemError:
    """A succeeded job whose checkpoint is gone from storage (removed by hand, a volume lost): the server's
    fault, said as a problem before FileResponse would fail mid-response on the missing file."""
    log.error("job %s: succeeded, but its output file is missing from storage", job_id)
    return ProblemError(500, f"job {job_id} succeeded, but its cleansed checkpoint is missing from the "
                             "service's storage; submit the job again, and report the job id to the "
                             "service's operators")


def _check_range(header: str, size: int) -> None:
    """Refuse a Range that FileResponse would refuse, but as a problem (it answers those in plain text)."""
    try:
        FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader:
        raise ProblemError(400, f"the Range header {header!r} is malformed; use e.g. bytes=0-1023") from None
    except RangeNotSatisfiable:
        raise ProblemError(416, f"the Range {header!r} lies outside the file's {size} bytes",
                           headers={"Content-Range": f"bytes */{size}"}) from None


@router.post("/jobs/{job_id}/cancel", status_code=202, summary="Cancel a queued or running job",
             responses={200: {"description": "the job is cancelled: it was queued, or was cancelled already",
                              "model": JobResource},
                        **responses(401, 404, 409, 503)})
def cancel_job(job_id: str, owner: Owner, service: Service, response: Response) -> JobResource:
    """A queued job is cancelled at once (200). A running one becomes `cancelling` (202) and stops at its
    next epoch boundary (`anp`: within 50 iterations; `ibau`: at the end of its round), then turns `cancelled`.
    Asking again changes nothing and answers as the job stands."""
    with service.db.session() as session:
        job = _owned(session, job_id, owner)
        try:
            jobs.request_cancel(session, job)
        except jobs.InvalidTransition as error:
            raise ProblemError(409, f"job {job_id} already {error.status}: nothing to cancel") from None
        resource, dispatch = JobResource.of(job), job.dispatch
    if resource.status == Status.CANCELLED:
        response.status_code = 200
        # A job queued again after its worker died ends here with no run of its own to remove what the killed
        # one wrote (a job that ends with a run has that run remove it: `worker.tasks`).
        service.storage.remove_outputs(job_id, through=dispatch, keep=None)
    return resource


@router.delete("/jobs/{job_id}", status_code=204, summary="Delete a finished job and its files",
               responses=responses(401, 404, 409, 503))
def delete_job(job_id: str, owner: Owner, service: Service) -> Response:
    """Only a succeeded, failed or cancelled job can be deleted: cancel a queued or running one first."""
    with service.db.session() as session:
        job = _owned(session, job_id, owner)
        try:
            jobs.delete_job(session, job)
        except jobs.InvalidTransition as error:
            first = "" if error.status == Status.CANCELLING else f"cancel it first (POST /jobs/{job_id}/cancel), then "
            raise ProblemError(409, f"job {job_id} is {error.status}; {first}delete it once GET /jobs/{job_id} "
                                    "shows it cancelled") from None
    service.storage.remove(job_id)
    return Response(status_code=204)
