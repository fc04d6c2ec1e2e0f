"""Receiving `POST /sanitize`'s multipart body straight to disk.

Starlette's `request.form()` spools every file before a route sees it; here python-multipart's streaming
parser is fed the body as it arrives and each file part is written, chunk by chunk, into the job's incoming
folder (`core.storage`), hashed on the way and stopped at the size cap. The API never holds an upload in
memory, and never parses one: checkpoints and archives are the worker's to open.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.problems import FieldError, ProblemError, invalid
from core.jobs import FileRecord
from core.params import PARAMS_LIMIT
from core.storage import FileWriter, Storage, TooLarge

FILE_FIELDS = {
    "model": "the suspect checkpoint: safetensors, or a torch.save state dict",
    "clean_data": "clean labelled images: a zip/tar(.gz) of <class>/<image> folders, or an npz with x and y",
    "test_data": "optional labelled test images (same formats); default: a hold-out of clean_data",
    "poison_data": "optional triggered images with their true labels, for ASR (same formats)",
    "teacher": "optional ready teacher checkpoint instead of fine-tuning one (methods nad and finetune, and auto "
               "with either as a candidate)",
}
PARAMS = "params"
REQUIRED = ("model", "clean_data", PARAMS)


@dataclass
class Upload:
    """A completely received body: the stored files by field name, and the raw `params` text."""

    files: dict[str, FileRecord] = field(default_factory=dict)
    params: str | None = None


def _invalid(field_name: str, message: str) -> ProblemError:
    return invalid([FieldError(field=field_name, message=message)])


def _display_name(raw: bytes | None) -> str | None:
    """The client's file name, for display only: its last path component, printable, at most 255 chars."""
    if raw is None:
        return None
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable())[:255] or None


class _Receiver:
    """python-multipart callbacks that route each part to a FileWriter or the params buffer."""

    def __init__(self, storage: Storage, job_id: str, limit: int) -> None:
        self.storage, self.job_id, self.limit = storage, job_id, limit
        self.upload = Upload()
        self.finished = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field: str | None = None
        self._filename: str | None = None
        self._writer: FileWriter | None = None
        self._text: bytearray | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers.clear()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in FILE_FIELDS:
            try:
                self._writer = self.storage.input_writer(self.job_id, name, self.limit)
            except FileExistsError:
                raise _invalid(name, "sent twice; send each file once") from None
            self._filename = _display_name(options.get(b"filename"))
        elif name == PARAMS:
            if self.upload.params is not None:
                raise _invalid(name, "sent twice; send it once")
            self._text = bytearray()
        else:
            expected = ", ".join([*FILE_FIELDS, PARAMS])
            raise _invalid(name or "(unnamed part)", f"unknown field; the fields are {expected}")
        self._field = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writer is not None:
            try:
                self._writer.write(data[start:end])
            except TooLarge as error:
                raise ProblemError(413, f"{self._field} is larger than the limit of {error.limit} bytes per "
                                        "file; send fewer images or a smaller checkpoint") from None
            return
        if len(self._text) + end - start > PARAMS_LIMIT:
            raise _invalid(PARAMS, f"longer than {PARAMS_LIMIT} bytes; it is a small JSON object")
        self._text.extend(data[start:end])

    def _part_end(self) -> None:
        if self._writer is not None:
            stored = self._writer.close()
            self._writer = None
            if stored.size == 0:
                raise _invalid(self._field, "the file is empty")
            self.upload.files[self._field] = FileRecord(self._field, stored.path, stored.size, stored.sha256,
                                                        self._filename)
        else:
            self.upload.params = self._text.decode("utf-8", "replace")
            self._text = None

    def _end(self) -> None:
        self.finished = True

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


async def receive(request: Request, storage: Storage, job_id: str, limit: int) -> Upload:
    """Stream the body into `job_id`'s incoming folder and return what arrived. Raises ProblemError (400,
    413, 415, 422) for a body that cannot make a job, 507 when the disk fills up while receiving it; the
    caller removes the folder on any exception."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data":
        raise ProblemError(415, "send the job as multipart/form-data (curl: -F model=@model.pt "
                                "-F clean_data=@clean.zip -F 'params={...}')")
    if not boundary:  # a Content-Type set by hand: the client's multipart encoder adds the boundary it used
        raise ProblemError(400, "the Content-Type multipart/form-data names no boundary; do not set the header "
                                "yourself, let your HTTP client set it with the body (curl -F, requests' files=)")
    receiver = _Receiver(storage, job_id, limit)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise ProblemError(400, f"the multipart body is malformed ({error}); let your HTTP client build "
                                "it (curl -F, requests' files=, httpx's files=)") from None
    except ClientDisconnect:
        raise ProblemError(400, "the upload stopped before the body was complete; send it again") from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk, or the service's quota on it
            raise
        raise ProblemError(507, "the service ran out of disk space while receiving the upload, so the job was "
                                "not kept; send it again later, and tell the service's operators if this "
                                "persists") from None
    finally:
        receiver.abort()
    if not receiver.finished:
        raise ProblemError(400, "the multipart body ended before its closing boundary; send it again")
    upload = receiver.upload
    present = {*upload.files, *([PARAMS] if upload.params is not None else [])}
    missing = [name for name in REQUIRED if name not in present]
    if missing:
        raise invalid([FieldError(field=name, message="missing; every job needs model, clean_data and params")
                       for name in missing])
    return upload
