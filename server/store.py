"""The delta store: a folder of `<task>.delta.safetensors` files made for one base.

The store lists tasks from the files' metadata headers and skips (with a warning) any file made
for another base, whose header is invalid, or whose tensors do not fit the model.

Registration writes the upload to a hidden temporary file in the same folder and reads it in
full (checksum, base fingerprint, tensor names and shapes). Only then is it renamed into place,
so a task becomes visible complete or not at all.

The folder is the source of truth. Files may be copied in or removed by hand while the server
runs (for example `git checkout demo/store`): listing, registration and deletion first rescan
the folder when its modification time has changed. A file that cannot be served is remembered
with its reason, so registering its name says why the name is taken, and deleting the task
removes the file.

Start-up removes the temporary files of uploads that a crash interrupted and logs how many it
removed. Symbolic links in the folder are never served, so a link cannot expose a file outside
the store.

Each registration gets a new `version`. The engine and the residency cache key on
(task, version), so a task deleted and registered again under the same name never runs with the
old delta.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from deltastore.apply import check_compatible
from deltastore.format import (
    FILE_SUFFIX,
    DeltaFile,
    DeltaFormatError,
    DeltaMetadata,
    FingerprintMismatch,
    delta_file_name,
    read_delta,
    read_metadata,
    validate_task_name,
)
from server.errors import plural

logger = logging.getLogger(__name__)

UPLOAD_PREFIX = ".upload-"  # temporary upload files; hidden, and never end in FILE_SUFFIX


class TaskNotFound(LookupError):
    """No delta file for this task is in the store."""

    def __init__(self, task: str) -> None:
        super().__init__(f"task {task!r} is not in the delta store; list the tasks with GET /v1/models")
        self.task = task


class TaskExists(ValueError):
    """A task of this name is already registered (or the name is the base's)."""

    def __init__(self, task: str, *, reason: str = "is already registered; delete it first or choose another name") -> None:
        super().__init__(f"task {task!r} {reason}")
        self.task = task


@dataclass(frozen=True)
class StoredTask:
    """One usable delta file of the store."""

    task: str
    path: Path
    metadata: DeltaMetadata
    file_bytes: int
    version: int
    mtime_ns: int = 0  # the file's modification time when indexed; a changed file is indexed again


class Store:
    """Index of the usable delta files in `folder`; safe to call from several threads."""

    def __init__(
        self, folder: Path, *, base_fingerprint: str, params: Mapping[str, torch.Tensor], reserved: frozenset[str]
    ) -> None:
        self.folder = Path(folder)
        self.base_fingerprint = base_fingerprint
        self._params = params  # only names and shapes are read, never values
        self._reserved = reserved  # model ids a task may not take (the base's)
        self._tasks: dict[str, StoredTask] = {}
        self._skipped: dict[str, str] = {}  # file name -> why it cannot be served
        self._scanned_mtime: int | None = None  # the folder's st_mtime_ns at the last scan
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.leftovers_removed = 0  # unfinished uploads the last scan removed

    # -- listing ---------------------------------------------------------------------------

    def scan(self) -> None:
        """Rebuild the index from the folder; leftover temporary uploads are removed (start-up only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        leftovers = 0
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(UPLOAD_PREFIX):
                logger.warning("removing the unfinished upload %s (%d bytes)", path.name, _size(path))
                path.unlink(missing_ok=True)
                leftovers += 1
        self._rescan()
        if leftovers:
            logger.warning("removed %s from %s", plural(leftovers, "unfinished upload"), self.folder)
        self.leftovers_removed = leftovers

    def _refresh(self) -> None:
        """Rescan when the folder changed since the last scan (a file added, removed or renamed)."""
        try:
            mtime = self.folder.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._scanned_mtime:
            self._rescan()

    def _rescan(self) -> None:
        """Index every delta file of the folder; unchanged files keep their entry and version."""
        mtime = self.folder.stat().st_mtime_ns
        with self._lock:
            known = {entry.path.name: entry for entry in self._tasks.values()}
        found: dict[str, StoredTask] = {}
        skipped: dict[str, str] = {}
        for path in sorted(self.folder.iterdir()):
            if not path.name.endswith(FILE_SUFFIX) or path.name.startswith(UPLOAD_PREFIX):
                continue
            if path.is_symlink():
                skipped[path.name] = "it is a symbolic link, and the store serves only regular files"
                continue
            if not path.is_file():
                continue
            previous = known.get(path.name)
            if previous is not None and _same_file(previous, path):
                found[previous.task] = previous
                continue
            entry, reason = self._index_file(path)
            if entry is None:
                skipped[path.name] = reason
            else:
                found[entry.task] = entry
        new_skips = {name: reason for name, reason in skipped.items() if self._skipped.get(name) != reason}
        for name, reason in new_skips.items():
            logger.warning("skipping %s: %s", name, reason)
        # Folder times are coarse (a few ms on Linux), so a change made in the same tick as this scan
        # could keep the same time: until the folder time is a second old, the next call rescans.
        settled = time.time_ns() - mtime > 1_000_000_000
        with self._lock:
            self._tasks = found
            self._skipped = skipped
            self._scanned_mtime = mtime if settled else None
        logger.debug("scanned %s: %s", self.folder, plural(len(found), "usable delta file"))

    def tasks(self) -> list[StoredTask]:
        self._refresh()
        with self._lock:
            return [self._tasks[name] for name in sorted(self._tasks)]

    def get(self, task: str) -> StoredTask:
        """Return the stored task, picking up a file copied into the folder since the last scan."""
        with self._lock:
            entry = self._tasks.get(task)
        if entry is not None:
            return entry
        try:
            path = self.folder / delta_file_name(task)
        except ValueError as e:
            raise TaskNotFound(task) from e
        if task in self._reserved or path.is_symlink() or not path.is_file():
            raise TaskNotFound(task)
        entry, reason = self._index_file(path)
        if entry is None:
            logger.warning("skipping %s: %s", path.name, reason)
            with self._lock:
                self._skipped[path.name] = reason
            raise TaskNotFound(task)
        with self._lock:
            return self._tasks.setdefault(task, entry)

    def total_bytes(self) -> int:
        self._refresh()
        with self._lock:
            return sum(entry.file_bytes for entry in self._tasks.values())

    def read(self, entry: StoredTask) -> DeltaFile:
        """Read and verify a stored delta in full (checksum and base fingerprint)."""
        return read_delta(entry.path, expected_fingerprint=self.base_fingerprint)

    # -- registration ----------------------------------------------------------------------

    def check_new_name(self, task: str) -> str:
        """Raise ValueError for an invalid name and TaskExists for a taken one."""
        validate_task_name(task)
        if task in self._reserved:
            raise TaskExists(task, reason="is the base model's id; choose another task name")
        self._refresh()
        name = delta_file_name(task)
        with self._lock:
            taken = task in self._tasks
            skipped = self._skipped.get(name)
        if skipped is not None:
            raise TaskExists(
                task,
                reason=f"has a file in the store that cannot be served ({skipped}); "
                f"remove it with DELETE /v1/deltas/{task}, then register again",
            )
        if taken or (self.folder / name).exists():
            raise TaskExists(task)
        return task

    def new_upload(self) -> tuple[int, Path]:
        """Open a hidden temporary file in the store folder; return its descriptor and path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=UPLOAD_PREFIX, suffix=".tmp")
        return fd, Path(name)

    def register(self, task: str, upload: Path) -> StoredTask:
        """Verify the uploaded file in full and publish it as `task`; the upload is consumed either way."""
        try:
            self.check_new_name(task)

            # 1. Header first: a file for another task, base or architecture is rejected before its
            # arrays are read. Then the full read: checksum, base fingerprint and every array.
            header = read_metadata(upload)
            if header.base_fingerprint != self.base_fingerprint:
                raise FingerprintMismatch(
                    f"the file was made for base {header.base_fingerprint!r}, but the base in use is "
                    f"{self.base_fingerprint!r}; compress the fine-tune again against this base"
                )
            check_compatible(header, self._params)
            delta = read_delta(upload, expected_fingerprint=self.base_fingerprint)
            metadata = delta.metadata
            del delta
            if metadata.task != task:
                raise DeltaFormatError(
                    f"the file's metadata names task {metadata.task!r}, not {task!r}; "
                    f"upload it as {metadata.task!r} or compress it again under the new name"
                )
            check_compatible(metadata, self._params)

            # 2. Publish under the lock, so two uploads of one name cannot both win.
            path = self.folder / delta_file_name(task)
            with self._lock:
                if task in self._tasks or path.exists():
                    raise TaskExists(task)
                os.replace(upload, path)
                stat = path.stat()
                entry = StoredTask(
                    task=task, path=path, metadata=metadata, file_bytes=stat.st_size,
                    version=next(self._versions), mtime_ns=stat.st_mtime_ns,
                )
                self._tasks[task] = entry
            _fsync_folder(self.folder)
        finally:
            upload.unlink(missing_ok=True)
        logger.info(
            "registered task %s: method %s, nnz %d, %d bytes", task, metadata.method, metadata.nnz, entry.file_bytes
        )
        return entry

    def delete(self, task: str) -> StoredTask | None:
        """Remove the task's file and index entry; raise TaskNotFound if it has no file in the store.

        Returns None when the file was one the store could not serve (its reason was logged).
        """
        try:
            entry = self.get(task)
        except TaskNotFound:
            path = self.folder / delta_file_name(task)
            with self._lock:
                reason = self._skipped.pop(path.name, None)
            if reason is None or path.is_symlink() or not path.is_file():
                raise
            path.unlink(missing_ok=True)
            logger.info("deleted %s, which could not be served: %s", path.name, reason)
            return None
        with self._lock:
            self._tasks.pop(task, None)
        entry.path.unlink(missing_ok=True)
        logger.info("deleted task %s (%s)", task, entry.path.name)
        return entry

    def forget(self, task: str) -> None:
        """Drop a task from the index whose file has disappeared from the folder."""
        with self._lock:
            self._tasks.pop(task, None)

    # -- helpers ---------------------------------------------------------------------------

    def _index_file(self, path: Path) -> tuple[StoredTask | None, str]:
        """Check one file's header against the base; return its entry, or None and the reason."""
        try:
            metadata = read_metadata(path)
            if metadata.base_fingerprint != self.base_fingerprint:
                return None, f"made for base {metadata.base_fingerprint}, but the base in use is {self.base_fingerprint}"
            if path.name != delta_file_name(metadata.task):
                return None, f"its metadata names task {metadata.task!r}"
            if metadata.task in self._reserved:
                return None, f"task {metadata.task!r} is the base model's id"
            check_compatible(metadata, self._params)
            stat = path.stat()
        except (DeltaFormatError, OSError) as e:
            return None, str(e)
        entry = StoredTask(
            task=metadata.task, path=path, metadata=metadata, file_bytes=stat.st_size,
            version=next(self._versions), mtime_ns=stat.st_mtime_ns,
        )
        return entry, ""


def _same_file(entry: StoredTask, path: Path) -> bool:
    """True when `path` still has the size and modification time it had when `entry` was indexed."""
    try:
        stat = path.stat()
    except OSError:
        return False
    return stat.st_size == entry.file_bytes and stat.st_mtime_ns == entry.mtime_ns


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
