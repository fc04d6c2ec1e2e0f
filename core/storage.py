"""Job files on disk: one storage root, one folder per job, names chosen here and never by a client.

    <root>/incoming/<instance>/.lock                     held locked by the API process that receives here
    <root>/incoming/<instance>/<job id>/inputs/<role>    an upload being received by that process
    <root>/jobs/<job id>/inputs/<role>                   a job's uploads (role: model, clean_data, ...)
    <root>/jobs/<job id>/output/<dispatch>/model.safetensors   the cleansed checkpoint (worker.dispatch)

An upload is written under incoming/ and renamed into jobs/ only once it is complete and its job recorded,
so a half-received upload never looks like a job's files. Each receiving process has its own instance folder
and holds an exclusive flock on its lock file for as long as it lives; the kernel drops the lock however the
process ends (kill -9 included). So a lock that `sweep_incoming` can take marks a folder whose owner is dead,
and it removes exactly those, never an upload another live replica is receiving. The API and the worker
share the root (one volume in compose).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

JOB_ID = re.compile(r"[0-9a-f]{32}")
LOCK_FILE = ".lock"


def output_name(dispatch: int) -> str:
    """A job's output path, relative to its folder, for the run of its `dispatch`-th sending."""
    return f"output/{dispatch}/model.safetensors"


def _sending(name: str) -> int | None:
    """The sending whose output folder `name` is (`output_name`'s), None for a name no run makes: `str.isdigit`
    alone takes "²", which `int` refuses, and "007", which would pass for sending 7's."""
    return int(name) if name.isascii() and name.isdigit() and name == str(int(name)) else None


def size_of(folder: Path) -> int:
    """Bytes in `folder`: its files' sizes. A folder or file removed while it is counted (the API deleting the
    job meanwhile) counts nothing: os.walk skips a folder it cannot list."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


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
        """Close a file that will be discarded. Closing flushes its last buffered bytes, which fails again on a
        full disk: that second error must not hide the first, which says why the upload stopped."""
        with contextlib.suppress(OSError):
            self._stream.close()


def _lock_folder(folder: Path) -> int | None:
    """An open descriptor holding the exclusive flock of `folder`'s lock file; None when a live process holds
    it or the folder is gone. The lock is checked to still be the folder's: whoever removes a folder (the
    sweeper) holds its lock while it does, so a lock won on a file unlinked meanwhile is a lock on nothing."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._inbox: Path | None = None
        self._claiming = threading.Lock()

    def _checked(self, job_id: str) -> str:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return job_id

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / self._checked(job_id)

    def incoming_dir(self, job_id: str) -> Path:
        return self.inbox() / self._checked(job_id)

    def inbox(self) -> Path:
        """This process's instance folder under incoming/, claimed on first use and kept locked until the
        process ends (the descriptor is never closed), so that no other process sweeps it while it lives."""
        with self._claiming:  # uploads are received on several threads
            while self._inbox is None:
                folder = self.root / "incoming" / uuid.uuid4().hex
                folder.mkdir(parents=True)
                if _lock_folder(folder) is not None:  # else a sweeper took it in between: try another
                    self._inbox = folder
            return self._inbox

    def input_writer(self, job_id: str, role: str, limit: int) -> FileWriter:
        """A writer for the upload `role` of a job being received; FileExistsError if it was sent before."""
        return FileWriter(self.incoming_dir(job_id), f"inputs/{role}", limit)

    def adopt(self, job_id: str, into: str | None = None) -> bool:
        """Move a completely received upload into place as the job's folder, or as the folder of the job `into`
        (one it repeats). False, the upload discarded, where that folder is there already: a repeat of the
        same upload took the place first (`api.jobs`)."""
        target = self.job_dir(into or job_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.incoming_dir(job_id).rename(target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # anything but a folder there: a fault
                raise
            self.discard_incoming(job_id)
            return False
        return True

    def discard_incoming(self, job_id: str) -> None:
        shutil.rmtree(self.incoming_dir(job_id), ignore_errors=True)

    def path(self, job_id: str, relative: str) -> Path:
        """The file of a job at `relative`, a path this module chose (checked all the same)."""
        parts = PurePosixPath(relative).parts
        if not parts or relative.startswith("/") or ".." in parts:
            raise ValueError(f"not a path inside a job folder: {relative!r}")
        return self.job_dir(job_id).joinpath(*parts)

    def output_path(self, job_id: str, dispatch: int) -> Path:
        """Where the run of a job's `dispatch`-th sending writes the cleansed checkpoint: one file per sending,
        so a worker whose job was taken from it (`worker.dispatch`) never overwrites its successor's."""
        return self.path(job_id, output_name(dispatch))

    def remove_outputs(self, job_id: str, through: int, keep: str | None) -> None:
        """Remove the output folders of the job's sendings up to `through`, but the one of `keep` (the output
        the job recorded, relative to its folder): what runs that failed, were cancelled or were killed wrote,
        a temporary file of safetensors' included. A later sending's folder is left alone: its run may be
        writing in it. The output folder goes too once empty; a run that makes its own folder in it at that
        moment makes the output folder again (`Path.mkdir(parents=True)` tries once more)."""
        for sending, folder in self._unkept(job_id, keep):
            if sending <= through:
                shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: the recorded output, or a later sending's
            (self.job_dir(job_id) / "output").rmdir()

    def unkept_outputs(self, job_id: str, keep: str | None) -> list[Path]:
        """The job's output folders, one per sending that wrote, but the one of `keep`, in sending order. Links
        are none of them (this module makes none): nothing is removed through one."""
        return [folder for _, folder in self._unkept(job_id, keep)]

    def _unkept(self, job_id: str, keep: str | None) -> list[tuple[int, Path]]:
        """`unkept_outputs`, each folder with its sending."""
        outputs = self.job_dir(job_id) / "output"
        try:
            children = [] if outputs.is_symlink() else list(outputs.iterdir())
        except FileNotFoundError:  # nothing written, or the job, finished, was deleted meanwhile
            return []
        named = [(_sending(child.name), child) for child in children]
        return sorted((sending, child) for sending, child in named
                      if sending is not None and output_name(sending) != keep
                      and child.is_dir() and not child.is_symlink())

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_ids(self) -> list[str]:
        """The ids of the job folders under jobs/, sorted. A name that is no job id is not a job's folder, nor is
        a link (this module makes none), which `nad tidy` would otherwise size, and try to remove, through."""
        try:
            children = list((self.root / "jobs").iterdir())
        except FileNotFoundError:
            return []
        return sorted(child.name for child in children
                      if JOB_ID.fullmatch(child.name) and not child.is_symlink() and child.is_dir())

    def sweep_incoming(self) -> int:
        """Remove the instance folders under incoming/ whose process is dead (their lock is free), with the
        uploads it was receiving when it died; how many. The lock is held while removing, so a process
        claiming a folder at the same moment cannot end up with one removed under it."""
        folder = self.root / "incoming"
        if not folder.is_dir():
            return 0
        swept = 0
        for inbox in folder.iterdir():
            fd = _lock_folder(inbox)
            if fd is not None:
                shutil.rmtree(inbox, ignore_errors=True)
                os.close(fd)
                swept += 1
        return swept

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created under the root (for readiness checks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
