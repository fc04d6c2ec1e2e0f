"""Job files on disk: one storage root, one folder per job, names chosen here and never by a client.

    <root>/incoming/<job id>/inputs/<role>     an upload being received
    <root>/jobs/<job id>/inputs/<role>         a job's uploads (role: model, clean_data, test_data, ...)
    <root>/jobs/<job id>/output/model.safetensors

An upload is written under incoming/ and renamed into jobs/ only once it is complete and its job recorded,
so a half-received upload never looks like a job's files, and whatever a crash leaves in incoming/ is
garbage that `sweep_incoming` removes. The API and the worker share the root (one volume in compose).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

JOB_ID = re.compile(r"[0-9a-f]{32}")
OUTPUT_PATH = "output/model.safetensors"


class TooLarge(Exception):
    """An upload went past the size cap; nothing past the cap was written."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredFile:
    """A file as written: its path relative to the job's folder, its size and sha256."""

    path: str
    size: int
    sha256: str


class FileWriter:
    """Streams one upload to disk, hashing it on the way and refusing any chunk that would pass the cap."""

    def __init__(self, folder: Path, relative: str, limit: int) -> None:
        self.relative, self.limit = relative, limit
        self.size = 0
        self._digest = hashlib.sha256()
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._stream = target.open("xb")

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.limit:
            self._stream.close()
            raise TooLarge(self.limit)
        self._stream.write(chunk)
        self._digest.update(chunk)
        self.size += len(chunk)

    def close(self) -> StoredFile:
        self._stream.close()
        return StoredFile(self.relative, self.size, self._digest.hexdigest())

    def abort(self) -> None:
        self._stream.close()


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _checked(self, job_id: str) -> str:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return job_id

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / self._checked(job_id)

    def incoming_dir(self, job_id: str) -> Path:
        return self.root / "incoming" / self._checked(job_id)

    def input_writer(self, job_id: str, role: str, limit: int) -> FileWriter:
        """A writer for the upload `role` of a job being received; FileExistsError if it was sent before."""
        return FileWriter(self.incoming_dir(job_id), f"inputs/{role}", limit)

    def adopt(self, job_id: str) -> None:
        """Move a completely received upload into place as the job's folder."""
        target = self.job_dir(job_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.incoming_dir(job_id).rename(target)

    def discard_incoming(self, job_id: str) -> None:
        shutil.rmtree(self.incoming_dir(job_id), ignore_errors=True)

    def path(self, job_id: str, relative: str) -> Path:
        """The file of a job at `relative`, a path this module chose (checked all the same)."""
        parts = PurePosixPath(relative).parts
        if not parts or relative.startswith("/") or ".." in parts:
            raise ValueError(f"not a path inside a job folder: {relative!r}")
        return self.job_dir(job_id).joinpath(*parts)

    def output_path(self, job_id: str) -> Path:
        return self.path(job_id, OUTPUT_PATH)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def sweep_incoming(self, older_than: float) -> int:
        """Remove uploads left in incoming/ by a process that died while receiving them; how many."""
        folder = self.root / "incoming"
        if not folder.is_dir():
            return 0
        stale = [p for p in folder.iterdir() if time.time() - p.stat().st_mtime > older_than]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created under the root (for readiness checks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
